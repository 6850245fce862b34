"""Nearest-neighbour lookup and top-k: naive PyTorch vs nnclr_fast vs FAISS on the same inputs.

Every case fixes one precision ("tf32", "bf16" or "ieee") and every method runs at that precision,
so each row of the report compares like with like; ``is_default`` marks each method's own default.
On a GPU each call reads the next of several copies of the queue (``Runner.queue_copies``), so no
method is timed with the queue resident in L2; FAISS, which runs on its own streams, is timed
eagerly, the others from a captured CUDA graph (see ``nnclr_fast.benchmark.CallTimer``).
"""

from __future__ import annotations

import functools

import pytest
import torch

import nnclr_fast
from nnclr_fast import benchmark as baselines

METHODS = ("naive", "nnclr_fast", "faiss")
TOPK = 5


def default_precision(method: str, dtype: str, device: torch.device) -> str:
    if dtype == "bfloat16":
        return "bf16"
    if method == "nnclr_fast" and device.type == "cuda":
        return "tf32"
    # PyTorch leaves TF32 off for matmuls by default and FAISS never enables it.
    return "ieee"


def _api_precision(precision: str) -> str:
    return "ieee" if precision == "ieee" else "default"


def lookup_fn(method: str, precision: str):
    """``lookup(z, queue) -> (out, indices)`` of ``method`` at ``precision``."""
    if method == "naive":
        return lambda z, queue: baselines.naive_lookup(z, queue, precision)
    if method == "faiss":
        return lambda z, queue: baselines.faiss_lookup(z, queue, precision)
    api = _api_precision(precision)
    return lambda z, queue: nnclr_fast.nn_lookup(z, queue, precision=api, return_indices=True)


def topk_fn(method: str, precision: str):
    """``topk(z, queue) -> (values, indices)`` of ``method`` at ``precision``."""
    if method == "naive":
        return lambda z, queue: baselines.naive_topk(z, queue, TOPK, precision)
    if method == "faiss":
        return lambda z, queue: baselines.faiss_topk(z, queue, TOPK, precision)
    api = _api_precision(precision)
    return lambda z, queue: nnclr_fast.nn_topk(z, queue, TOPK, precision=api)


def skip_unsupported(bench, method: str, case):
    if method == "nnclr_fast":
        bench.skip_if_interpreted()
    if method == "faiss":
        reason = baselines.faiss_skip_reason(bench.device, case.torch_dtype, case.precision)
        if reason:
            pytest.skip(reason)


@functools.lru_cache(maxsize=2)
def _reference_topk(z: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    # Exact float32 on the stored queue values: the yardstick for every method's answers.
    with baselines.torch_matmul_precision("ieee"):
        return baselines.naive_topk(z, queue, TOPK, "ieee")[1]


def record(bench, method: str, case, op: str, pass_: str) -> dict:
    info = {
        "op": op,
        "pass": pass_,
        "method": method,
        "precision": case.precision,
        "is_default": case.precision == default_precision(method, case.dtype, bench.device),
        "B": case.B,
        "K": case.K,
        "D": case.D,
        "dtype": case.dtype,
        "queue_bytes": case.K * case.D * case.torch_dtype.itemsize,
        "flops": 2 * case.B * case.K * case.D,
    }
    if method == "faiss" and bench.device.type == "cuda":
        info["faiss_reserved_bytes"] = baselines.FaissGpu.get(bench.device).reserved_bytes
    return info


def _top1_agreement(z, queue, idx) -> float:
    ref = _reference_topk(z, queue)[:, 0]
    return float((idx == ref).float().mean())


@pytest.mark.parametrize("method", METHODS)
def test_lookup_forward(benchmark, bench, case, method):
    skip_unsupported(bench, method, case)
    z, queue, _ = bench.inputs(case.shape)
    lookup = lookup_fn(method, case.precision)
    with baselines.torch_matmul_precision(case.precision):
        info = record(bench, method, case, "lookup", "forward")
        info["agreement_with_ieee"] = _top1_agreement(z, queue, lookup(z, queue)[1])
        bench.measure(benchmark, lambda q: lookup(z, q), info, bench.queue_copies(queue), graph=method != "faiss")


@pytest.mark.parametrize("method", METHODS)
def test_lookup_forward_backward(benchmark, bench, case, method):
    skip_unsupported(bench, method, case)
    z, queue, grad = bench.inputs(case.shape)
    lookup = lookup_fn(method, case.precision)
    z_leaf = z.clone().requires_grad_(True)

    def step(q):
        out, _ = lookup(z_leaf, q)
        out.backward(grad)
        # Handed to the caller, not kept on z: the memory probe then counts it as this call's.
        grad_z, z_leaf.grad = z_leaf.grad, None
        return grad_z

    with baselines.torch_matmul_precision(case.precision):
        info = record(bench, method, case, "lookup", "forward+backward")
        bench.measure(benchmark, step, info, bench.queue_copies(queue), graph=method != "faiss")


@pytest.mark.parametrize("method", METHODS)
def test_topk_forward(benchmark, bench, case, method):
    skip_unsupported(bench, method, case)
    z, queue, _ = bench.inputs(case.shape)
    topk = topk_fn(method, case.precision)
    with baselines.torch_matmul_precision(case.precision):
        info = record(bench, method, case, f"top{TOPK}", "forward")
        ref = _reference_topk(z, queue)
        found = topk(z, queue)[1]
        # Share of the exact top-k that the method found, in any order.
        info["agreement_with_ieee"] = float((found[:, :, None] == ref[:, None, :]).any(dim=2).float().mean())
        bench.measure(benchmark, lambda q: topk(z, q), info, bench.queue_copies(queue), graph=method != "faiss")
