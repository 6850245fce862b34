"""Fused nearest-neighbour search: normalise queries, score every queue row, keep the best.

Stage 1 (`_nn_search_partial_kernel`) is the heavy one. The grid is (query blocks, queue splits):
each program owns BLOCK_B queries and one contiguous slice of the queue, streams that slice once
in BLOCK_K-row tiles, and keeps a running top-k of (score, index) per query in registers. Scores
live only tile by tile: the B x K similarity matrix never exists. Splitting the queue axis fills
the GPU even when B / BLOCK_B alone would leave most SMs idle (B=512 is 8 query blocks).

Stage 2 combines the per-split winners. For k == 1, `_nn_combine_gather_kernel` picks the winning
split and copies the winning queue row straight into the output (the gather is fused there);
for k > 1 the host side merges the (B, splits * k) candidates with a stable sort.

Ordering contract (matches nnclr_fast.reference): higher score first, NaN scores never win,
ties go to the lowest queue index.
"""

from __future__ import annotations

import functools
import os
import re

import numpy
import torch
import triton
import triton.language as tl

from nnclr_fast.reference import NORMALIZE_EPS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.findall(r"\d+", version)[:2]
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run these kernels with these versions, or None.

    Triton < 3.7's interpreter turns a runtime loop bound into an int via a 1-element array,
    which NumPy >= 2.4 refuses; the kernels themselves (compiled for a GPU) are unaffected.
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with NumPy {numpy_version}: "
            "install 'numpy<2.4' or Triton >= 3.7"
        )
    return None


def _search_configs():
    if interpreting():
        # The interpreter cannot benchmark, and small tiles keep it quick.
        return [triton.Config({"BLOCK_B": 16, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4)]
    # Shared memory per pipeline stage is (BLOCK_B + BLOCK_K) * BLOCK_D * itemsize; every config
    # below fits Hopper's 227 KiB with float32 operands (checked by compiling for sm_90, see
    # tests/test_kernel_compiles.py).
    return [
        triton.Config({"BLOCK_B": bb, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bb, bk, bd, w, s in [
            (64, 128, 64, 4, 3),
            (64, 128, 64, 8, 3),
            (64, 64, 64, 4, 4),
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 3),
            (64, 256, 32, 8, 3),
            (32, 128, 64, 4, 4),
            (16, 128, 64, 4, 4),
        ]
    ]


def _prune_configs(configs, named_args, **kwargs):
    # Query blocks much larger than the batch only waste tensor-core work.
    batch = named_args["B"]
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= max(16, triton.next_power_of_2(batch))]
    return kept or configs[:1]


@triton.autotune(
    configs=_search_configs(),
    key=["B", "D", "TOPK", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _nn_search_partial_kernel(
    z_ptr,
    q_ptr,
    valid_ptr,
    part_val_ptr,
    part_idx_ptr,
    B,
    K,
    D,
    split_rows,
    stride_zb,
    stride_zd,
    stride_qk,
    stride_qd,
    eps,
    HAS_VALID: tl.constexpr,
    TOPK: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_splits = tl.num_programs(1)

    # Tensor-core operand type: the queue's own dtype (TF32 for float32), or exact float32.
    if IEEE:
        dot_ty: tl.constexpr = tl.float32
    else:
        dot_ty: tl.constexpr = q_ptr.dtype.element_ty
    # When z already has the operand dtype it feeds the dot untouched (a plain GEMM pipeline) and
    # the normalisation becomes a per-row scale of the scores, which cannot change their order.
    # Otherwise z is normalised before the cast: a raw float32 query could overflow float16.
    SCALE_BEFORE_DOT: tl.constexpr = z_ptr.dtype.element_ty != dot_ty

    rows_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows_b < B
    offs_d = tl.arange(0, BLOCK_D)
    z_rows = z_ptr + rows_b.to(tl.int64)[:, None] * stride_zb

    # The L2 norm of each query, clamped like F.normalize.
    sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        zc = tl.load(z_rows + d[None, :] * stride_zd, mask=mask_b[:, None] & (d[None, :] < D), other=0.0)
        zc = zc.to(tl.float32)
        sq += tl.sum(zc * zc, axis=1)
    denom = tl.maximum(tl.sqrt(sq), eps)

    stop = K
    if HAS_VALID:
        # Clamped so that a bad device-side count can never read outside the queue.
        stop = tl.minimum(tl.maximum(tl.load(valid_ptr).to(tl.int32), 1), K)
    start = pid_s * split_rows
    end = tl.minimum(start + split_rows, stop)

    slot = tl.arange(0, TOPK_PAD)
    # Empty slots hold -inf with distinct placeholder indices (the split's first rows, so a query
    # with no finite score falls back to the lowest indices, as the reference does). Padding slots
    # hold +inf so they are never the slot a new candidate evicts.
    run_val = tl.where(slot[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros((BLOCK_B, TOPK_PAD), tl.float32)
    run_idx = (start + slot)[None, :] + tl.zeros((BLOCK_B, TOPK_PAD), tl.int32)

    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(start, end, BLOCK_K):
        rows_k = k0 + offs_k
        mask_k = rows_k < end
        q_rows = q_ptr + rows_k.to(tl.int64)[:, None] * stride_qk
        acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask_d = d < D
            zc = tl.load(z_rows + d[None, :] * stride_zd, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            if SCALE_BEFORE_DOT:
                zc = (zc.to(tl.float32) / denom[:, None]).to(dot_ty)
            q = tl.load(q_rows + d[None, :] * stride_qd, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            q = q.to(dot_ty)
            if IEEE:
                acc = tl.dot(zc, tl.trans(q), acc, input_precision="ieee")
            elif UPCAST_DOT:
                # The Triton interpreter mis-computes 16-bit dots; the product of two 16-bit values
                # is exact in float32, so the upcast dot gives the tensor-core numbers.
                acc = tl.dot(zc.to(tl.float32), tl.trans(q.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(zc, tl.trans(q), acc, input_precision="tf32")
        if not SCALE_BEFORE_DOT:
            acc = acc / denom[:, None]
        # NaN scores rank as -inf (acc != acc only for NaN), like rows past the end.
        scores = tl.where(mask_k[None, :] & (acc == acc), acc, float("-inf"))

        for _ in tl.static_range(TOPK):
            # Best remaining candidate of this tile, lowest index on ties...
            best = tl.max(scores, axis=1)
            best_idx = tl.min(tl.where(scores == best[:, None], rows_k[None, :], 2147483647), axis=1)
            # ...replaces the worst running entry if strictly better. Among equally-bad entries the
            # highest index goes first, so surviving ties keep the lowest indices. A later tile
            # never ties its way in: its indices are all higher.
            worst = tl.min(run_val, axis=1)
            worst_idx = tl.max(tl.where(run_val == worst[:, None], run_idx, -1), axis=1)
            evict = (run_val == worst[:, None]) & (run_idx == worst_idx[:, None]) & (best > worst)[:, None]
            run_val = tl.where(evict, best[:, None], run_val)
            run_idx = tl.where(evict, best_idx[:, None], run_idx)
            if TOPK > 1:
                scores = tl.where(rows_k[None, :] == best_idx[:, None], float("-inf"), scores)

    # Partial results are laid out (query, split, slot) so stage 2 reads each query contiguously.
    out_off = (rows_b[:, None] * num_splits + pid_s) * TOPK + slot[None, :]
    out_mask = mask_b[:, None] & (slot[None, :] < TOPK)
    tl.store(part_val_ptr + out_off, run_val, mask=out_mask)
    tl.store(part_idx_ptr + out_off, run_idx.to(tl.int64), mask=out_mask)


@triton.jit
def _nn_combine_gather_kernel(
    part_val_ptr,
    part_idx_ptr,
    q_ptr,
    out_ptr,
    idx_out_ptr,
    D,
    num_splits,
    stride_qk,
    stride_qd,
    stride_ob,
    stride_od,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    best_val = float("-inf")
    best_idx = tl.load(part_idx_ptr + row * num_splits).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        mask = s < num_splits
        vals = tl.load(part_val_ptr + row * num_splits + s, mask=mask, other=float("-inf"))
        idxs = tl.load(part_idx_ptr + row * num_splits + s, mask=mask, other=0)
        block_best = tl.max(vals, axis=0)
        # Splits cover increasing index ranges, so the lowest index among equal scores wins.
        block_idx = tl.min(tl.where(vals == block_best, idxs, 9223372036854775807), axis=0)
        better = block_best > best_val
        best_idx = tl.where(better, block_idx, best_idx)
        best_val = tl.maximum(best_val, block_best)
    tl.store(idx_out_ptr + row, best_idx)

    offs_d = tl.arange(0, BLOCK_D)
    src = q_ptr + best_idx * stride_qk
    dst = out_ptr + row.to(tl.int64) * stride_ob
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d < D
        v = tl.load(src + d * stride_qd, mask=mask_d)
        tl.store(dst + d * stride_od, v.to(out_ptr.dtype.element_ty), mask=mask_d)


# --------------------------------------------------------------------------------------------
# Launchers. Inputs are already validated by nnclr_fast.lookup.

# Largest k the register-resident running top-k handles; larger k takes the chunked path.
MAX_KERNEL_TOPK = 16


def _split_rows(batch: int, num_rows: int, device: torch.device) -> int:
    """Queue rows per program along the split axis.

    Aim for ~4 waves of programs over the SMs, assuming 64-query blocks, while keeping each split
    long enough (>= 4 tiles) that the per-split top-k and the stage-2 merge stay negligible.
    Rounded to a multiple of the largest BLOCK_K so tiles never straddle two splits.
    """
    if interpreting():
        # Up to 8 short splits: the CPU tests exercise the cross-split merge, and the
        # interpreter's per-program overhead stays bounded for large queues.
        align = 32
        return triton.cdiv(max(align, triton.cdiv(num_rows, 8)), align) * align
    align = 256
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    query_blocks = triton.cdiv(batch, 64)
    target_splits = max(1, (4 * sms) // query_blocks)
    rows = max(4 * align, triton.cdiv(num_rows, target_splits))
    return triton.cdiv(rows, align) * align


def _search_partials(z, queue, valid, k, ieee):
    if interpreting():
        problem = interpreter_incompatibility(triton.__version__, numpy.__version__)
        if problem:
            raise RuntimeError(problem)
    batch, dim = z.shape
    num_rows = queue.shape[0]
    split_rows = _split_rows(batch, num_rows, z.device)
    num_splits = triton.cdiv(num_rows, split_rows)
    part_val = torch.empty((batch, num_splits, k), dtype=torch.float32, device=z.device)
    part_idx = torch.empty((batch, num_splits, k), dtype=torch.int64, device=z.device)
    grid = lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), num_splits)  # noqa: E731
    _nn_search_partial_kernel[grid](
        z,
        queue,
        valid if valid is not None else part_idx,  # never read when HAS_VALID is False
        part_val,
        part_idx,
        batch,
        num_rows,
        dim,
        split_rows,
        z.stride(0),
        z.stride(1),
        queue.stride(0),
        queue.stride(1),
        NORMALIZE_EPS,
        HAS_VALID=valid is not None,
        TOPK=k,
        TOPK_PAD=triton.next_power_of_2(k),
        IEEE=ieee,
        UPCAST_DOT=interpreting(),
    )
    return part_val, part_idx


def triton_nn_lookup(z, queue, valid, ieee):
    """(nearest rows in z's dtype, int64 indices) for 2-D z and queue on one device."""
    part_val, part_idx = _search_partials(z, queue, valid, 1, ieee)
    batch, dim = z.shape
    num_splits = part_val.shape[1]
    out = torch.empty((batch, dim), dtype=z.dtype, device=z.device)
    idx = torch.empty((batch,), dtype=torch.int64, device=z.device)
    _nn_combine_gather_kernel[(batch,)](
        part_val,
        part_idx,
        queue,
        out,
        idx,
        dim,
        num_splits,
        queue.stride(0),
        queue.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_S=min(triton.next_power_of_2(num_splits), 1024),
        BLOCK_D=min(triton.next_power_of_2(dim), 1024),
    )
    return out, idx


def triton_nn_topk(z, queue, k, valid, ieee):
    """(B, k) float32 scores and int64 indices, best first, for k <= MAX_KERNEL_TOPK."""
    part_val, part_idx = _search_partials(z, queue, valid, k, ieee)
    batch = z.shape[0]
    vals = part_val.reshape(batch, -1)
    idx = part_idx.reshape(batch, -1)
    # Two stable sorts order by (score desc, index asc): equal scores keep the lowest index.
    by_index = idx.argsort(dim=1, stable=True)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_score = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, by_score), idx.gather(1, by_score)
