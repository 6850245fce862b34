"""Fused nearest-neighbour search: normalise the queries once, score every queue row, keep the best.

Two kernels per call on one stream, no host sync (a step can be captured in a CUDA graph):

  * `_normalize_queries_kernel` (the first pass) writes every query normalised and rounded to
    the tensor-core operand dtype into a padded, contiguous (B_pad, D_pad) buffer, plus each
    row's two norm factors (for a lookup that finds nothing, whose answer is the query itself);
  * `_nn_search_kernel` runs on a grid of (query blocks, queue splits) sized to one wave of the
    chosen config (SMs x CTAs per SM), so no program waits for a second wave:

      - each program loads its BLOCK_B rows of that buffer with a plain load and no arithmetic
        on them (D <= 256; larger D loads D-chunks of it per queue tile, D_RESIDENT=False). On
        Hopper Triton then feeds the block to wgmma straight from shared memory: no per-tile
        reload into registers, few registers, and (bf16/fp16) two CTAs on an SM, whose epilogues
        and barriers overlap each other's tensor work;
      - it streams its contiguous slice of the queue in one loop (Triton's software pipeline
        spans the whole slice), queue tiles fed by TMA tensor descriptors where the queue allows
        (16-byte aligned base and row stride, contiguous rows) or by pointer loads otherwise;
      - scores exist only tile by tile, masked by a select (an add would be folded into the
        dot's accumulator: one more initialisation per tile, and the dot moved); a running top-k
        of (score, index) per query lives in registers, compared lexicographically (score
        descending, index ascending);
      - stage 2 is fused: every program writes its per-query candidates, and the last program of
        a query block to arrive (an atomic counter) merges the splits and writes the final result
        (for a lookup it also gathers the winning rows).

Ordering contract (nnclr_fast.ops.reference): higher score first, NaN scores rank as -inf (but the
row stays a candidate), ties go to the lowest queue index, rows at or past `valid` never appear,
and a slot no searchable row can fill holds index -1 and score -inf. Rows are normalised as the
contract says (`_norm_step`: scaled by a power of two, no overflow, no eps), and every narrowing
cast rounds to nearest even (`_round_to`), on a GPU and under the interpreter alike.
"""

from __future__ import annotations

import functools
import re

import numpy
import torch
import triton
import triton.language as tl
from triton.errors import TritonError

from nnclr_fast.ops.nn_search_plan import (
    INTERPRETER,
    DeviceSpec,
    FusedSearchUnavailable,
    SearchProblem,
    TensorDescriptor,
    fallback_plan,
    interpreting,
    plan_search,
)

# Index of "no candidate": above every real index, so it loses every tie, and reported as -1.
SENTINEL = tl.constexpr(2**31 - 1)


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


@triton.jit
def _pow2(e):
    """2^e, exactly, for an integer tensor e in [-126, 127]."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _norm_step(v, exp_run, sq_run):
    """Add a D-chunk ``v`` (float32, one row per line) to each row's running norm state.

    The state is (E, S): E the largest biased float32 exponent seen (at most 253) and S the sum of
    squares of the row scaled by 2^(127 - E), which puts its largest entry in [1, 4): no
    overflow for any finite row and no underflow that matters. ||row|| = sqrt(S) / 2^(127 - E).
    All scalings are powers of two, so they are exact. Start from (0, 0).
    """
    big = tl.max(tl.abs(v), axis=1)
    exp_new = tl.maximum(exp_run, tl.minimum((big.to(tl.int32, bitcast=True) >> 23) & 0xFF, 253))
    # Old entries shrink by 2^(E_old - E_new); below 2^-126 their squares vanish anyway.
    shrink = _pow2(tl.maximum(exp_run - exp_new, -126))
    scaled = v * _pow2(127 - exp_new)[:, None]
    return exp_new, sq_run * (shrink * shrink) + tl.sum(scaled * scaled, axis=1)


@triton.jit
def _norm_factors(exp_run, sq_run):
    """(scale, inv): ``row * scale * inv`` is row / ||row||. An all-zero row gets inv 0 (it stays
    zero); a row holding Inf gets NaN (so does one holding NaN, through S)."""
    inv = 1.0 / tl.sqrt(tl.where(sq_run == 0, 1.0, sq_run))
    inv = tl.where(sq_run == 0, 0.0, tl.where(sq_run == float("inf"), float("nan"), inv))
    return _pow2(127 - exp_run), inv


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``dtype``. A GPU's float32 -> bfloat16 cast rounds,
    the interpreter's truncates: the bit arithmetic gives the GPU's answer everywhere (float16
    casts already round to nearest even on both)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # The carry could turn a NaN with a small payload into Inf: NaN gets the quiet NaN.
        bits = tl.where(x != x, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _take_best(run_val, run_idx, scores, cols, slot, TOPK: tl.constexpr):
    """Merge the best TOPK (score, index) pairs of each row of `scores` into the running list.

    `cols` holds each candidate's index (SENTINEL: no candidate), per row or (1, N) for every row
    alike; scores are never NaN here. With
    TOPK == 1 the running list is 1-D. Taken candidates are removed by index, so a real row that
    scores -inf is still taken exactly once.
    """
    for _ in tl.static_range(TOPK):
        best = tl.max(scores, axis=1)
        best_idx = tl.min(tl.where(scores == best[:, None], cols, SENTINEL), axis=1)
        if TOPK == 1:
            better = (best > run_val) | ((best == run_val) & (best_idx < run_idx))
            run_val = tl.where(better, best, run_val)
            run_idx = tl.where(better, best_idx, run_idx)
        else:
            # The lexicographically worst running entry (lowest score, then highest index). Padding
            # slots hold (+inf, -1) and are never it.
            worst = tl.min(run_val, axis=1)
            worst_idx = tl.max(tl.where(run_val == worst[:, None], run_idx, -1), axis=1)
            better = (best > worst) | ((best == worst) & (best_idx < worst_idx))
            evict = (run_val == worst[:, None]) & (run_idx == worst_idx[:, None]) & better[:, None]
            run_val = tl.where(evict, best[:, None], run_val)
            run_idx = tl.where(evict, best_idx[:, None], run_idx)
            taken = cols == best_idx[:, None]
            scores = tl.where(taken, float("-inf"), scores)
            cols = tl.where(taken, SENTINEL, cols)
    return run_val, run_idx


@triton.jit
def _normalize_queries_kernel(
    z_ptr,
    zn_ptr,
    znorm_ptr,
    B,
    D,
    stride_zb,
    stride_zd,
    stride_nb,
    ROWS: tl.constexpr,
    NORM_D: tl.constexpr,
):
    """The first pass: zn[r, :stride_nb] = z[r] / ||z[r]||, rounded to zn's dtype (the operand
    dtype), and znorm[r] = (scale, inv) of the norm, for every row r of ROWS * programs. Rows
    past B and columns past D are written too (zeros; NaN in the row of a query holding Inf or
    NaN, which scores NaN anyway), so the search kernel reads whole blocks with no mask."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_b = rows < B
    offs = tl.arange(0, NORM_D)
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zb
    # The norm in D-chunks, so no more than one chunk of float32 queries is live.
    z_exp = tl.zeros((ROWS,), dtype=tl.int32)
    z_sq = tl.zeros((ROWS,), dtype=tl.float32)
    for d0 in range(0, D, NORM_D):
        d = d0 + offs
        zc = tl.load(z_rows + d[None, :] * stride_zd, mask=in_b[:, None] & (d[None, :] < D), other=0.0)
        z_exp, z_sq = _norm_step(zc.to(tl.float32), z_exp, z_sq)
    z_scale, z_inv = _norm_factors(z_exp, z_sq)
    tl.store(znorm_ptr + rows * 2, z_scale)
    tl.store(znorm_ptr + rows * 2 + 1, z_inv)
    zn_rows = zn_ptr + rows.to(tl.int64)[:, None] * stride_nb
    for d0 in range(0, stride_nb, NORM_D):
        d = d0 + offs
        zc = tl.load(z_rows + d[None, :] * stride_zd, mask=in_b[:, None] & (d[None, :] < D), other=0.0)
        zc = zc.to(tl.float32) * z_scale[:, None] * z_inv[:, None]
        tl.store(zn_rows + d[None, :], _round_to(zc, zn_ptr.dtype.element_ty))


@triton.jit
def _tile_dot(a, q, acc, IEEE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ q^T for one (D-chunk of a) queue tile."""
    if IEEE or UPCAST_DOT:
        # UPCAST_DOT: the interpreter mis-computes 16-bit dots; a product of two 16-bit values is
        # exact in float32, so the upcast dot gives the tensor-core numbers.
        acc = tl.dot(a.to(tl.float32), tl.trans(q.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(q), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _nn_search_kernel(
    zn_ptr,
    znorm_ptr,
    z_ptr,
    q_ptr,
    q_desc,
    valid_ptr,
    part_val_ptr,
    part_idx_ptr,
    counter_ptr,
    out_ptr,
    out_idx_ptr,
    out_val_ptr,
    B,
    K,
    D,
    stride_nb,
    stride_zb,
    stride_zd,
    stride_qk,
    stride_qd,
    stride_ob,
    stride_od,
    HAS_VALID: tl.constexpr,
    NORMALIZE_QUEUE: tl.constexpr,
    TOPK: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    LOOKUP: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    D_RESIDENT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NORM_D: tl.constexpr,
    MERGE_COLS: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_splits = tl.num_programs(1)

    rows_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows_b < B
    offs_d = tl.arange(0, BLOCK_D)
    # The first pass's output: padded to whole blocks, so no mask, and nothing to compute on it.
    zn_rows = zn_ptr + rows_b.to(tl.int64)[:, None] * stride_nb + offs_d[None, :]
    if D_RESIDENT:
        zr = tl.load(zn_rows)

    stop = K
    if HAS_VALID:
        # Clamped on the device: a bad count can never read outside the queue, and 0 searches nothing.
        # In 64 bits: a count of 2^31 or 2^32 + 1 must search every row, not none or one.
        stop = tl.minimum(tl.maximum(tl.load(valid_ptr).to(tl.int64), 0), K).to(tl.int32)
    # The searchable rows are dealt out in whole tiles, so no tile straddles two splits.
    split_rows = tl.cdiv(tl.cdiv(stop, BLOCK_K), num_splits) * BLOCK_K
    start = pid_s * split_rows
    end = tl.minimum(start + split_rows, stop)

    slot = tl.arange(0, TOPK_PAD)
    if TOPK == 1:
        run_val = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        run_idx = tl.full((BLOCK_B,), SENTINEL, tl.int32)
    else:
        # Empty slots get distinct indices just below SENTINEL, so evicting one never evicts two.
        pad = slot[None, :] >= TOPK
        run_val = tl.where(pad, float("inf"), float("-inf")) + tl.zeros((BLOCK_B, TOPK_PAD), tl.float32)
        run_idx = tl.where(pad, -1, SENTINEL - TOPK_PAD + slot[None, :]) + tl.zeros((BLOCK_B, TOPK_PAD), tl.int32)

    offs_k = tl.arange(0, BLOCK_K)
    for k0 in tl.range(start, end, BLOCK_K):
        rows_k = k0 + offs_k
        in_slice = rows_k < end
        q_rows = q_ptr + rows_k.to(tl.int64)[:, None] * stride_qk
        acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        q_exp = tl.zeros((BLOCK_K,), dtype=tl.int32)
        q_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        if D_RESIDENT:
            if USE_TMA:
                # Rows past K arrive as zeros (TMA bounds); they are masked below like every row past `end`.
                q = q_desc.load([k0, 0])
            else:
                q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=in_slice[:, None] & (offs_d[None, :] < D), other=0.0)
            acc = _tile_dot(zr, q, acc, IEEE, DOT_PRECISION, UPCAST_DOT)
            if NORMALIZE_QUEUE:
                q_exp, q_sq = _norm_step(q.to(tl.float32), q_exp, q_sq)
        else:
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                if USE_TMA:
                    q = q_desc.load([k0, d0])
                else:
                    q = tl.load(q_rows + d[None, :] * stride_qd, mask=in_slice[:, None] & (d[None, :] < D), other=0.0)
                acc = _tile_dot(tl.load(zn_rows + d0), q, acc, IEEE, DOT_PRECISION, UPCAST_DOT)
                if NORMALIZE_QUEUE:
                    q_exp, q_sq = _norm_step(q.to(tl.float32), q_exp, q_sq)
        if NORMALIZE_QUEUE:
            # Two factors, not their product: scale * inv overflows for rows of subnormal entries.
            q_scale, q_inv = _norm_factors(q_exp, q_sq)
            acc = acc * q_scale[None, :] * q_inv[None, :]
        # Per column, not per score: rows past the slice get -inf and the sentinel index, so they
        # lose every comparison, even against a real row scoring -inf (which has a lower index).
        # max.f32 returns the non-NaN operand: NaN scores become -inf in one instruction.
        scores = tl.where(in_slice[None, :], tl.maximum(acc, float("-inf")), float("-inf"))
        cols = tl.where(in_slice, rows_k, SENTINEL)
        run_val, run_idx = _take_best(run_val, run_idx, scores, cols[None, :], slot, TOPK)

    # Stage 1 output: per query, TOPK_PAD candidates per split (padding slots as "no candidate").
    if TOPK == 1:
        part_off = rows_b * num_splits + pid_s
        tl.store(part_val_ptr + part_off, run_val, mask=mask_b)
        tl.store(part_idx_ptr + part_off, run_idx, mask=mask_b)
    else:
        pad = slot[None, :] >= TOPK
        part_off = (rows_b[:, None] * num_splits + pid_s) * TOPK_PAD + slot[None, :]
        tl.store(part_val_ptr + part_off, tl.where(pad, float("-inf"), run_val), mask=mask_b[:, None])
        # Every empty slot is stored as SENTINEL: it can then never enter the merged list.
        empty = pad | (run_idx >= SENTINEL - TOPK_PAD)
        tl.store(part_idx_ptr + part_off, tl.where(empty, SENTINEL, run_idx), mask=mask_b[:, None])

    # Stage 2, fused: the barrier orders every thread's partial stores before the counter's
    # release; the last program of this query block to arrive sees all splits' candidates.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + pid_b, 1, sem="acq_rel")
    if arrived == num_splits - 1:
        num_cands = num_splits * TOPK_PAD
        offs_m = tl.arange(0, MERGE_COLS)
        if TOPK == 1:
            fin_val = tl.full((BLOCK_B,), float("-inf"), tl.float32)
            fin_idx = tl.full((BLOCK_B,), SENTINEL, tl.int32)
        else:
            pad = slot[None, :] >= TOPK
            fin_val = tl.where(pad, float("inf"), float("-inf")) + tl.zeros((BLOCK_B, TOPK_PAD), tl.float32)
            fin_idx = tl.where(pad, -1, SENTINEL - TOPK_PAD + slot[None, :]) + tl.zeros((BLOCK_B, TOPK_PAD), tl.int32)
        for c0 in range(0, num_cands, MERGE_COLS):
            c = c0 + offs_m
            m = mask_b[:, None] & (c[None, :] < num_cands)
            off = rows_b[:, None] * num_cands + c[None, :]
            cv = tl.load(part_val_ptr + off, mask=m, other=float("-inf"), cache_modifier=".cg")
            ci = tl.load(part_idx_ptr + off, mask=m, other=SENTINEL, cache_modifier=".cg")
            fin_val, fin_idx = _take_best(fin_val, fin_idx, cv, ci, slot, TOPK)

        if LOOKUP:
            found = fin_idx != SENTINEL
            tl.store(out_idx_ptr + rows_b, tl.where(found, fin_idx, -1).to(tl.int64), mask=mask_b)
            # The winning rows, in z's dtype; with nothing searchable, the normalised query instead
            # (from z and the first pass's factors, rounded once, to z's dtype).
            src = q_ptr + tl.where(found, fin_idx, 0).to(tl.int64)[:, None] * stride_qk
            dst = out_ptr + rows_b.to(tl.int64)[:, None] * stride_ob
            z_rows = z_ptr + rows_b.to(tl.int64)[:, None] * stride_zb
            z_scale = tl.load(znorm_ptr + rows_b * 2)
            z_inv = tl.load(znorm_ptr + rows_b * 2 + 1)
            offs_c = tl.arange(0, NORM_D)
            for d0 in range(0, D, NORM_D):
                d = d0 + offs_c
                m = mask_b[:, None] & (d[None, :] < D)
                row = tl.load(src + d[None, :] * stride_qd, mask=m & found[:, None], other=0.0)
                own = tl.load(z_rows + d[None, :] * stride_zd, mask=m & ~found[:, None], other=0.0)
                own = own.to(tl.float32) * z_scale[:, None] * z_inv[:, None]
                out_ty: tl.constexpr = out_ptr.dtype.element_ty
                v = tl.where(found[:, None], _round_to(row.to(tl.float32), out_ty), _round_to(own, out_ty))
                tl.store(dst + d[None, :] * stride_od, v, mask=m)
        elif TOPK == 1:
            tl.store(out_val_ptr + rows_b, fin_val, mask=mask_b)
            tl.store(out_idx_ptr + rows_b, tl.where(fin_idx == SENTINEL, -1, fin_idx).to(tl.int64), mask=mask_b)
        else:
            # Best first: extract the lexicographic maximum TOPK times.
            pad = slot[None, :] >= TOPK
            fin_val = tl.where(pad, float("-inf"), fin_val)
            fin_idx = tl.where(pad, SENTINEL, fin_idx)
            for j in tl.static_range(TOPK):
                best = tl.max(fin_val, axis=1)
                best_idx = tl.min(tl.where(fin_val == best[:, None], fin_idx, SENTINEL), axis=1)
                tl.store(out_val_ptr + rows_b * TOPK + j, best, mask=mask_b)
                unfilled = best_idx >= SENTINEL - TOPK_PAD
                tl.store(out_idx_ptr + rows_b * TOPK + j, tl.where(unfilled, -1, best_idx).to(tl.int64), mask=mask_b)
                taken = fin_idx == best_idx[:, None]
                fin_val = tl.where(taken, float("-inf"), fin_val)
                fin_idx = tl.where(taken, SENTINEL, fin_idx)


# --------------------------------------------------------------------------------------------
# Launchers. Inputs are already validated by nnclr_fast.ops.nn_search; the plan (config, grid,
# constexprs) comes from nnclr_fast.ops.nn_search_plan.


# Kernels (device, plan.kernel_key) that launched, and why those that failed did: a failure is
# learned once, so later calls that would build the same kernel go straight to the fallback.
_LAUNCHED: set[tuple] = set()
_FAILED: dict[tuple, str] = {}
# What a kernel that cannot compile or launch raises: Triton's own errors (OutOfResources,
# CompilationError, PTXASError) and the RuntimeErrors of its MLIR passes and GPU drivers.
_LAUNCH_ERRORS = (TritonError, RuntimeError)


def _search(z, queue, valid, k, lookup, ieee, normalize_queue):
    """The fused kernel's (out, indices, values); raises FusedSearchUnavailable (naming the device,
    the reason and the fix) when it cannot run this call here."""
    if interpreting():
        incompatible = interpreter_incompatibility(triton.__version__, numpy.__version__)
        if incompatible:
            raise FusedSearchUnavailable(incompatible)
        device = INTERPRETER
    else:
        device = DeviceSpec.of(z.device)
    plan = plan_search(SearchProblem.of(z, queue, k, lookup, ieee, normalize_queue, valid is not None), device)
    if not plan.fused:
        raise FusedSearchUnavailable(plan.fallback)
    key = (device, plan.kernel_key)
    if key in _FAILED:
        raise FusedSearchUnavailable(_FAILED[key])
    if key in _LAUNCHED:
        return _launch(plan, z, queue, valid, k, lookup)
    try:
        result = _launch(plan, z, queue, valid, k, lookup)
    except torch.OutOfMemoryError:
        raise  # the device's memory, not the kernel (and the fallback would need more of it)
    except _LAUNCH_ERRORS as e:
        reason = fallback_plan(
            device, f"the fused kernel ({plan.config.name}) failed to compile or launch ({_summary(e)})",
            "none needed for correct results; report it to nnclr_fast with the output of `python -m nnclr_fast`: "
            "its launch plans should fit every supported GPU").fallback
        # A kernel first built inside CUDA-graph capture may fail for that alone (loading a module
        # is not capturable): the PyTorch path is captured this time, the kernel tried again later.
        if not (z.is_cuda and torch.cuda.is_current_stream_capturing()):
            _FAILED[key] = reason
        raise FusedSearchUnavailable(reason) from e
    _LAUNCHED.add(key)
    return result


def _summary(error: Exception) -> str:
    # A CompilationError's text starts with the source excerpt; its own message is the news.
    text = getattr(error, "error_message", None) or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _launch(plan, z, queue, valid, k, lookup):
    batch, dim = z.shape
    q_desc = TensorDescriptor.from_tensor(queue, list(plan.block_shape)) if plan.use_tma else queue
    query_blocks, splits = plan.grid
    constexprs = dict(plan.constexprs)
    topk_pad = constexprs["TOPK_PAD"]

    dev = z.device
    # Allocated per call like the partial buffers: the caching allocator makes that cheap, and
    # nothing outlives the call (CUDA-graph capture records them as the graph's own).
    zn = torch.empty(plan.query_buffer, dtype=plan.query_dtype, device=dev)
    znorm = torch.empty((plan.query_buffer[0], 2), dtype=torch.float32, device=dev)
    part_val = torch.empty((batch, splits * topk_pad), dtype=torch.float32, device=dev)
    part_idx = torch.empty((batch, splits * topk_pad), dtype=torch.int32, device=dev)
    counter = torch.zeros((query_blocks,), dtype=torch.int32, device=dev)
    if lookup:
        out = torch.empty((batch, dim), dtype=z.dtype, device=dev)
        out_idx = torch.empty((batch,), dtype=torch.int64, device=dev)
        out_val = part_val  # never written
    else:
        out = z  # never written
        out_idx = torch.empty((batch, k), dtype=torch.int64, device=dev)
        out_val = torch.empty((batch, k), dtype=torch.float32, device=dev)
    first = plan.first_pass
    _normalize_queries_kernel[(plan.query_buffer[0] // first.rows,)](
        z, zn, znorm, batch, dim, z.stride(0), z.stride(1), zn.stride(0),
        ROWS=first.rows, NORM_D=constexprs["NORM_D"], num_warps=first.num_warps, num_stages=first.num_stages,
    )
    _nn_search_kernel[plan.grid](
        zn,
        znorm,
        z,
        queue,
        q_desc,
        valid if valid is not None else counter,  # never read when HAS_VALID is False
        part_val,
        part_idx,
        counter,
        out,
        out_idx,
        out_val,
        batch,
        queue.shape[0],
        dim,
        zn.stride(0),
        z.stride(0),
        z.stride(1),
        queue.stride(0),
        queue.stride(1),
        out.stride(0),
        out.stride(1),
        **constexprs,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        **({"maxnreg": plan.maxnreg} if plan.maxnreg is not None else {}),
    )
    return out, out_idx, out_val


def triton_nn_lookup(z, queue, valid, ieee, normalize_queue=False):
    """(nearest rows in z's dtype, int64 indices; -1 and the normalised query when nothing is searchable)."""
    out, idx, _ = _search(z, queue, valid, 1, True, ieee, normalize_queue)
    return out, idx


def triton_nn_topk(z, queue, k, valid, ieee, normalize_queue=False):
    """(B, k) float32 scores and int64 indices, best first, for k <= MAX_KERNEL_TOPK."""
    _, idx, vals = _search(z, queue, valid, k, False, ieee, normalize_queue)
    return vals, idx
