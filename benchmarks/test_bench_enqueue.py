"""Support-queue enqueue: nnclr_fast's fused op vs ``index_copy_`` with a host-computed index."""

from __future__ import annotations

import pytest
import torch

from nnclr_fast import benchmark as baselines

METHODS = ("index_copy", "nnclr_fast")


def make_queue(method: str, shape, device: torch.device):
    if method == "index_copy":
        return baselines.IndexCopyQueue(shape.K, shape.D, shape.torch_dtype, device)
    try:
        from nnclr_fast import SupportQueue
    except ImportError as exc:
        pytest.skip(f"nnclr_fast.SupportQueue is not available: {exc}")
    try:
        queue = SupportQueue(shape.K, shape.D, shape.torch_dtype).to(device)
    except RuntimeError as exc:
        # The C++ extension is compiled on first use; without a compiler (or, on a GPU, without
        # nvcc) there is no fused op to time.
        pytest.skip(f"the nnclr_fast enqueue extension cannot be built here: {exc}")
    if device.type == "cuda":
        from nnclr_fast.ops import enqueue as enqueue_op

        if not enqueue_op.has_cuda_kernel():
            pytest.skip("the nnclr_fast extension was built without its CUDA kernel (no nvcc)")
    return queue


@pytest.mark.parametrize("method", METHODS)
def test_enqueue(benchmark, bench, shape, method):
    queue = make_queue(method, shape, bench.device)
    x, _, _ = bench.inputs(shape)
    info = {"op": "enqueue", "pass": "write", "method": method, "precision": "n/a", "is_default": True}
    info.update(B=shape.B, K=shape.K, D=shape.D, dtype=shape.dtype)
    # The naive queue copies a host-built index each call, which a CUDA graph cannot replay.
    bench.measure(benchmark, lambda _: queue.enqueue(x), info, graph=False)
