"""The PyTorch path of nn_lookup / nn_topk: the queue scored in chunks with plain PyTorch ops.

It serves CPU tensors, float64 inputs, ``nn_topk`` with k above the kernel's limit, and every
device on which the fused Triton kernel cannot run.

Memory stays bounded whatever K is: at most ``chunk_rows`` queue rows are scored at a time, into
one (B, chunk_rows) buffer reused by every chunk, so B x K is never materialised. Same semantics
as the Triton kernel and the oracle in ``nnclr_fast.ops.reference`` (see its docstring): NaN ranks
lowest but is a real candidate, ties to the lowest index, rows at or past ``valid`` are never
returned, unfillable top-k slots hold (-inf, -1).

``valid`` may be a 0-dim tensor: rows at or past it are masked instead of skipped, so reading
it never syncs the host.

Where the time goes (B=512, D=256, K=98,304, float32, two cores): the GEMM is nearly all of it,
written into one reused buffer (``matmul(out=)``: no per-chunk allocation or page faults). One
vectorised pass follows it, the maxima of blocks of ``LOOKUP_BLOCK`` columns per query; the
column of a maximum (a scalar reduction in PyTorch, several times slower than ``amax``) is then
searched only for the queries whose best score this chunk improves (about ln(chunks) times per
query in all), and only inside the block that holds it. NaN costs nothing unless it is there:
``amax`` propagates it, and only the scores of the queries it touches are cleaned. Top-k reuses
the filter: a query takes part in a chunk's ``topk`` only if its chunk maximum beats its k-th
best so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnclr_fast.ops.common import NORMALIZE_EPS, compute_dtype

# Queue rows scored per chunk by default: as many as make a 4 MiB score block (2048 rows at
# B=512 float32, 4096 at B=256), read back from the last-level cache, and at least 1024. Every
# chunk costs at least two parallel regions (GEMM, amax), and with other processes on the cores
# each one can wait for a descheduled thread (on a loaded 2-core machine 1024-row chunks ran
# 2.5x slower than 4096-row ones at B=512), while smaller blocks stay in cache. On a quiet 2-core
# EPYC at B=512, D=256, K=98,304, 2, 4, 8 and 16 MiB blocks took 244, 238, 268 and 244 ms (medians
# of 5): 4 MiB is the compromise.
SCORE_BLOCK_BYTES = 4 << 20
MIN_CHUNK_ROWS = 1024
DEFAULT_CHUNK_ROWS = None  # None: sized from SCORE_BLOCK_BYTES

# Lookup: a chunk's scores are reduced per block of this many columns first (see torch_nn_lookup).
# 64 keeps the in-block search of even B=512 queries under ATen's parallel grain (no barrier).
LOOKUP_BLOCK = 64

_NEG_INF = float("-inf")


def _query_operand(z: torch.Tensor, queue: torch.Tensor, ieee: bool) -> torch.Tensor:
    zn = F.normalize(z.to(compute_dtype(z, queue)), dim=1)
    if not ieee and queue.dtype in (torch.bfloat16, torch.float16):
        # As the tensor cores see it: the normalised query rounded to the queue's dtype.
        zn = zn.to(queue.dtype).to(zn.dtype)
    return zn


def _searchable_stop(queue: torch.Tensor, valid) -> int:
    """Rows to score: all of them for a tensor ``valid`` (masked instead), else [0, valid)."""
    num_rows = queue.shape[0]
    if valid is None or isinstance(valid, torch.Tensor):
        return num_rows
    return min(max(int(valid), 0), num_rows)


def _chunk_scores(zn, queue, valid, normalize_queue: bool, chunk_rows: int | None):
    """Yield (first row, scores of rows [first, first + n)) over the searchable rows.

    The scores are a (B, n) view of one buffer that the next chunk overwrites. NaN is left in
    place (the callers clean it only where a chunk has some); rows at or past a tensor ``valid``
    score -inf.
    """
    batch, dim = zn.shape
    if chunk_rows is None:
        rows_for_block = SCORE_BLOCK_BYTES // (batch * zn.element_size())
        chunk_rows = max(MIN_CHUNK_ROWS, rows_for_block // LOOKUP_BLOCK * LOOKUP_BLOCK)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    stop = _searchable_stop(queue, valid)
    if stop == 0:
        return
    chunk = min(chunk_rows, stop)
    # One flat buffer: a short last chunk still gets a contiguous (B, n) view to write into.
    scores = zn.new_empty(batch * chunk)
    # Rows in the compute dtype (a 16-bit or float32 queue against float64 queries), and/or
    # divided by their norms: one chunk at a time, never a copy of the bank.
    convert = queue.dtype != zn.dtype or normalize_queue
    rows_buf = zn.new_empty((chunk, dim)) if convert else None
    if isinstance(valid, torch.Tensor):
        limit = _searchable_count(queue, valid)
        cols = torch.arange(chunk, device=zn.device)
    for start in range(0, stop, chunk):
        n = min(chunk, stop - start)
        rows = queue[start : start + n]
        if convert:
            rows = rows_buf[:n]
            rows.copy_(queue[start : start + n])
            if normalize_queue:
                # Exactly F.normalize's arithmetic: row / max(||row||, eps).
                rows.div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(NORMALIZE_EPS))
        sims = scores[: batch * n].view(batch, n)
        torch.matmul(zn, rows.T, out=sims)
        if isinstance(valid, torch.Tensor):
            sims.masked_fill_(cols[:n] >= limit - start, _NEG_INF)
        yield start, sims


def _host_reads_free(device: torch.device) -> bool:
    return device.type == "cpu"


def _nan_to_lowest_(x: torch.Tensor) -> torch.Tensor:
    return x.nan_to_num_(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)


def _searchable_count(queue, valid):
    """How many rows are searchable: a 0-dim tensor for a tensor ``valid`` (read on the device)."""
    if isinstance(valid, torch.Tensor):
        return valid.clamp(0, queue.shape[0]).to(torch.int64)
    return _searchable_stop(queue, valid)


def _topk_lowest_index(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of ``sims`` (no NaN), best first, ties to the lowest column.

    ``torch.topk`` finds the k-th best score but orders ties arbitrarily, so the winners are
    rebuilt: every score above the k-th, then the lowest-column scores equal to it.
    """
    k = min(k, sims.shape[1])
    vals, _ = sims.topk(k, dim=1)
    kth = vals[:, -1:]
    above = sims > kth
    tied = sims == kth
    keep = above | (tied & (tied.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True)))
    # Exactly k columns are kept per row; the k smallest of these unique keys are those columns.
    cols = torch.arange(sims.shape[1], device=sims.device)
    key = torch.where(keep, cols, cols + sims.shape[1])
    cols = key.topk(k, dim=1, largest=False, sorted=True).values
    vals = sims.gather(1, cols)
    order = vals.argsort(dim=1, descending=True, stable=True)
    return vals.gather(1, order), cols.gather(1, order)


def _chunk_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-min(k, n) of ``sims`` (no NaN), ordered (score desc, column asc).

    ``topk(k + 1)`` is enough wherever the k-th and (k+1)-th scores differ: the k winners are then
    unique and only their order among ties needs fixing. The rows with a tie across that
    boundary (rare with real data) take the exact, slower rebuild.
    """
    n = sims.shape[1]
    if n <= k:
        cols = torch.arange(n, device=sims.device).expand_as(sims)
        order = sims.argsort(dim=1, descending=True, stable=True)
        return sims.gather(1, order), cols.gather(1, order)
    vals, cols = sims.topk(k + 1, dim=1)
    clean = vals[:, k - 1] > vals[:, k]
    vals, cols = vals[:, :k], cols[:, :k]
    # Column order first, then a stable sort by score: ties end up lowest column first.
    by_col = cols.argsort(dim=1)
    vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
    by_val = vals.argsort(dim=1, descending=True, stable=True)
    vals, cols = vals.gather(1, by_val), cols.gather(1, by_val)
    if not bool(clean.all()):
        tied_rows = (~clean).nonzero().squeeze(1)
        tie_vals, tie_cols = _topk_lowest_index(sims.index_select(0, tied_rows), k)
        vals.index_copy_(0, tied_rows, tie_vals)
        cols.index_copy_(0, tied_rows, tie_cols)
    return vals, cols


def torch_nn_topk(
    z: torch.Tensor,
    queue: torch.Tensor,
    k: int,
    valid: int | torch.Tensor | None = None,
    ieee: bool = True,
    normalize_queue: bool = False,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) similarities (float32; float64 for float64 inputs) and int64 indices, best first."""
    zn = _query_operand(z, queue, ieee)
    batch = zn.shape[0]
    best_vals = zn.new_full((batch, k), _NEG_INF)
    best_idx = torch.full((batch, k), -1, dtype=torch.int64, device=zn.device)
    chunk_max = zn.new_empty(batch)
    # The filters below read flags on the host: free on the CPU, a sync per chunk on a GPU (which
    # takes this path for k > 16 only), where every query takes every chunk instead.
    host_reads = _host_reads_free(zn.device)
    every_row = torch.arange(batch, device=zn.device)
    for start, sims in _chunk_scores(zn, queue, valid, normalize_queue, chunk_rows):
        if not host_reads:
            rows = every_row
            chunk_vals, chunk_cols = _topk_lowest_index(_nan_to_lowest_(sims), k)
        else:
            torch.amax(sims, dim=1, out=chunk_max)
            # A query needs this chunk only if it beats its k-th best (ties go to the earlier,
            # lower index), hides a NaN (amax propagates it), or still has an empty slot.
            need = ~(chunk_max <= best_vals[:, -1]) | (best_idx[:, -1] < 0)
            rows = need.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            # The first chunks concern every query: no copy then (the buffer is scratch anyway).
            sub = sims if rows.numel() == batch else sims.index_select(0, rows)
            if bool(torch.isnan(chunk_max.index_select(0, rows)).any()):
                _nan_to_lowest_(sub)
            chunk_vals, chunk_cols = _chunk_topk(sub, k)
        # Both halves are ordered (score desc, index asc) and every running index is below this
        # chunk's, so a stable sort of their concatenation keeps ties on the lowest index; a
        # second stable sort moves the running empty slots (-1) behind every real candidate.
        vals = torch.cat([best_vals.index_select(0, rows), chunk_vals], dim=1)
        idx = torch.cat([best_idx.index_select(0, rows), chunk_cols + start], dim=1)
        order = vals.argsort(dim=1, descending=True, stable=True)
        vals, idx = vals.gather(1, order), idx.gather(1, order)
        order = (idx >= 0).to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :k]
        best_vals.index_copy_(0, rows, vals.gather(1, order))
        best_idx.index_copy_(0, rows, idx.gather(1, order))
    if isinstance(valid, torch.Tensor):
        # Slots holding masked rows (at or past valid) could only be filled by their -inf.
        unfilled = best_idx >= _searchable_count(queue, valid)
        best_vals.masked_fill_(unfilled, _NEG_INF)
        best_idx.masked_fill_(unfilled, -1)
    return best_vals, best_idx


def torch_nn_lookup(
    z: torch.Tensor,
    queue: torch.Tensor,
    valid: int | torch.Tensor | None = None,
    ieee: bool = True,
    normalize_queue: bool = False,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest rows in z's dtype, int64 indices); -1 and the normalised query where nothing is searchable."""
    zn = _query_operand(z, queue, ieee)
    batch = zn.shape[0]
    best_val = zn.new_full((batch,), _NEG_INF)
    best_idx = torch.full((batch,), -1, dtype=torch.int64, device=zn.device)
    chunk_max = zn.new_empty(batch)
    for start, sims in _chunk_scores(zn, queue, valid, normalize_queue, chunk_rows):
        n = sims.shape[1]
        # Maxima of blocks of LOOKUP_BLOCK columns (one vectorised pass; a short chunk is one
        # block), then of the chunk: the column of a maximum is then searched in one block only.
        block = LOOKUP_BLOCK if n % LOOKUP_BLOCK == 0 else n
        block_max = sims.view(batch, n // block, block).amax(dim=2)
        torch.amax(block_max, dim=1, out=chunk_max)
        # Only queries whose best score this chunk beats (strictly: ties stay on the earlier
        # chunk's lower index) or hides a NaN need the column of their maximum.
        rows = (~(chunk_max <= best_val)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        sub_max = chunk_max.index_select(0, rows)
        if bool(torch.isnan(sub_max).any()):
            # NaN in some scores: the exact, slower way for those queries (rare).
            sub = _nan_to_lowest_(sims.index_select(0, rows))
            vals, cols = sub.max(dim=1)
        else:
            # The first block holding the maximum, then the first column in it holding it: the
            # first maximal column of the chunk, as argmax finds it.
            first_block = block_max.index_select(0, rows).argmax(dim=1)
            in_block = sims.view(batch, n // block, block)[rows, first_block].argmax(dim=1)
            vals, cols = sub_max, first_block * block + in_block
        old = best_val.index_select(0, rows)
        better = vals > old
        best_val.index_copy_(0, rows, torch.where(better, vals, old))
        best_idx.index_copy_(0, rows, torch.where(better, cols + start, best_idx.index_select(0, rows)))
    # A query none of whose searchable scores beat -inf (all NaN or -inf) gets the first
    # searchable row, as argmax would; with nothing searchable it keeps -1.
    anything = torch.as_tensor(_searchable_count(queue, valid)) > 0  # on the device for a tensor valid
    best_idx = torch.where(best_idx < 0, torch.where(anything, 0, -1), best_idx)
    found = best_idx >= 0
    rows = queue.index_select(0, best_idx.clamp_min(0)).to(z.dtype)
    own = F.normalize(z.to(zn.dtype), dim=1).to(z.dtype)
    return torch.where(found[:, None], rows, own), best_idx
