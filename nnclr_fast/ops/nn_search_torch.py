"""The PyTorch path of nn_lookup / nn_topk: the queue scored in chunks with plain PyTorch ops.

It serves CPU tensors, float64 inputs, ``nn_topk`` with k above the kernel's limit, and every
device on which the fused Triton kernel cannot run. Its semantics are the contract written out
in ``nnclr_fast.ops.reference``; how it meets it:

Scores. The query is normalised as ``common.normalize_rows`` does (no overflow, no eps) in
float64 and rounded to float32 (float64 inputs stay float64); at precision "default" with a
16-bit queue it is then rounded to the queue's dtype (to nearest even), as tensor cores take it.
A chunk of queue rows is scored by the device's GEMM: on a CPU with native bfloat16
(AVX-512-BF16 or AMX, which oneDNN uses) a bfloat16 queue at "default" by a bfloat16 GEMM
(16-bit products, float32 accumulation, each score rounded to bfloat16), every other case by a
float32 (float64) GEMM of the chunk's rows (upcast where needed: products of 16-bit values are
exact in float32). With ``normalize_queue`` the rows are first scaled by a power of two (exact),
so that their norms neither overflow nor underflow, and each score is divided by its row's norm.

The choice. A GEMM's rounding depends on where a column sits in it (MKL computes the columns at
a tile's edge in another order), so identical rows can get different scores: the computed
scores only shortlist. On a CPU (host reads are free) each chunk records just the maxima of its
blocks of ``BLOCK`` rows; once all chunks are done, the blocks whose maximum lies within a true
rounding bound of a query's k-th best (found through the maxima of groups of ``GROUP`` blocks)
are recomputed row by row in the compute dtype (within the same bound), the rows that can
still reach it are re-scored in float64 from the same operands (their products are
exact there, and every pair is summed in one fixed order), and the k best re-scored rows win,
ties to the lowest index. So the answer is the exact top-k of the operands (up to float64
rounding), identical rows tie exactly, and the returned scores are the float64 ones rounded to
float32. The bound per query is ``gamma(2D + 16) * ||q|| * R`` with ``R`` the largest norm of a
finite row (1 under ``normalize_queue``; rows holding Inf or NaN score exactly, inf arithmetic
has no rounding) and ``gamma(n) = n u / (1 - n u)`` (a dot product of length D is off by at most
gamma(D) * sum |q_i r_i|; the rest covers the norms and the division), plus 2^-8 of the scores'
size where the GEMM writes bfloat16, plus an absolute ``tiny * (sqrt(D) (||q|| + R) + 2D + 2)``
(``tiny`` the smallest normal number of the accumulation): a GEMM may flush subnormal inputs,
products and partial sums to zero (oneDNN's bfloat16 GEMM does), which no relative bound covers.

Devices other than the CPU must not read device memory on the host (CUDA graph capture; see
``_host_reads_free``): there each query re-scores the ``k + SYNC_FREE_EXTRA`` best computed rows
of every chunk, which is exact whenever no chunk holds more rows than that within the bound of a
query's k-th best.

Where the time goes (B=512, D=256, K=98,304): nearly all of it is the GEMM, written into one
reused buffer (``matmul(out=)``: no per-chunk allocation or page faults). Per chunk only the
block maxima (one reduction across the middle of a view, at memory speed) and the rows' norms
follow it; the shortlist of random data is about one block and one re-scored row per query
(B=512, random unit rows: 1.0 and 1.0 for float32, 1.4 and 1.1 for the bfloat16 GEMM). NaN
costs nothing unless it is there: ``amax`` propagates it, and only chunks that have some are
scored again and cleaned.
"""

from __future__ import annotations

import torch

from nnclr_fast.ops.common import compute_dtype, normalize_rows

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

# Queue rows per block whose maximum every chunk records (see _block_max): the shortlist is the
# blocks whose maximum reaches the bound, so smaller blocks recompute fewer rows and record more
# maxima (B * K / BLOCK of them).
BLOCK = 16

# Blocks per group: the shortlist first compares the groups' maxima with each query's threshold
# and only then the blocks of the groups that reach it, so it reads B * K / (BLOCK * GROUP) maxima
# plus a few groups per query instead of comparing all B * K / BLOCK of them.
GROUP = 16

# Without host reads (see the module docstring): computed candidates re-scored per query, chunk
# and wanted row.
SYNC_FREE_EXTRA = 15

# Elements of gathered rows handled at a time when re-scoring: 2 MiB of float64, which the
# allocator reuses (fresh multi-MiB buffers cost page faults, several times the arithmetic).
RESCORE_ELEMENTS = 1 << 18

_NEG_INF = float("-inf")
# Index of an empty slot: sorts after every real row.
_NO_ROW = torch.iinfo(torch.int64).max


def _host_reads_free(device: torch.device) -> bool:
    return device.type == "cpu"


def _normalized_queries(z: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    # In float64, then rounded once: the correctly rounded quotient (B x D, cheap).
    return normalize_rows(z.double()).to(compute_dtype(z, queue))


def _query_operand(z: torch.Tensor, queue: torch.Tensor, ieee: bool) -> torch.Tensor:
    """The normalised queries as the GEMM sees them, in the compute dtype."""
    zn = _normalized_queries(z, queue)
    if not ieee and queue.dtype in (torch.bfloat16, torch.float16):
        zn = zn.to(queue.dtype).to(zn.dtype)
    return zn


def _native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN's check: AVX-512-BF16 or AMX).
    Elsewhere oneDNN emulates it, slower than upcasting to float32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _gemm_dtype(zq: torch.Tensor, queue: torch.Tensor, ieee: bool, normalize_queue: bool) -> torch.dtype:
    """Operand (and score) dtype of the chunk GEMM: bfloat16 where the CPU has it natively."""
    if (
        queue.dtype == torch.bfloat16
        and zq.dtype == torch.float32
        and zq.device.type == "cpu"
        and not ieee
        and not normalize_queue
        and _native_bfloat16()
    ):
        return torch.bfloat16
    return zq.dtype


def _slack(dim: int, dtype: torch.dtype, gemm_dtype: torch.dtype) -> tuple[float, float]:
    """(gamma, output unit) of a chunk score (see the module docstring): the GEMM's sum is off by
    at most gamma * ||q|| * ||row||, and its rounding to a bfloat16 result by at most the output
    unit times the score's size. gamma keeps 2^-20 to spare for the arithmetic that applies it."""
    unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    terms = (2 * dim + 16) * unit
    gamma = terms / (1 - terms) * (1 + 2.0**-20)
    return gamma, 2.0**-8 * (1 + 2.0**-20) if gemm_dtype == torch.bfloat16 else 0.0


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums in one fixed order (pairwise, by elementwise adds): the same values in a row give
    the same sum wherever the row sits, which a library reduction does not promise."""
    width = 1 << max(0, (x.shape[1] - 1).bit_length())
    if width != x.shape[1]:
        x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
    while width > 1:
        width //= 2
        x = x[:, :width] + x[:, width:]
    return x[:, 0]


def _rescore(zq, queue, normalize_queue, q_rows, cols):
    """float64 scores of the pairs (query ``q_rows[i]``, queue row ``cols[i]``) from the GEMM's
    operands; NaN becomes -inf (the NaN rule)."""
    out = torch.empty(q_rows.shape[0], dtype=torch.float64, device=zq.device)
    zq = zq.double()
    step = max(1, RESCORE_ELEMENTS // zq.shape[1])
    for s in range(0, q_rows.shape[0], step):
        a = zq.index_select(0, q_rows[s : s + step])
        rows = queue.index_select(0, cols[s : s + step]).double()
        scores = _tree_sum(a * rows)
        if normalize_queue:
            # float64 holds the square of any float32 value: no scaling needed here.
            norm = _tree_sum(rows * rows).sqrt_()
            # A zero row stays zero (its score is 0 * q: NaN for a NaN query, as in the GEMM).
            scores = torch.where(norm == 0, scores * 0, scores / norm)
        out[s : s + step] = scores
    return out.nan_to_num_(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)


def _merge(best_val, best_idx, vals, idx, k):
    """The k best of the running lists and new candidates, (score desc, index asc), empty slots
    last. Every new index must be above every running one and, per row, ascending: a stable sort
    by score then keeps ties in index order."""
    vals, idx = torch.cat([best_val, vals], dim=1), torch.cat([best_idx, idx], dim=1)
    order = vals.argsort(dim=1, descending=True, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = (idx == _NO_ROW).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


def _chunk_size(batch: int, score_dtype: torch.dtype, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        rows_for_block = SCORE_BLOCK_BYTES // (batch * score_dtype.itemsize)
        return max(MIN_CHUNK_ROWS, rows_for_block // BLOCK * BLOCK)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return chunk_rows


class _Scorer:
    """The chunk GEMM: ``score(start, n)`` returns the (n, B) scores of queue rows
    [start, start + n) against every query, a view of one buffer that the next call overwrites;
    NaN is left in place. Rows by queries, not the transpose: MKL's and oneDNN's GEMMs ran about
    8 % faster that way round at B=512, D=256 (one core, medians of 5)."""

    def __init__(self, zq, queue, stop, gemm_dtype, normalize_queue, chunk_rows):
        batch, dim = zq.shape
        self.chunk = min(_chunk_size(batch, gemm_dtype, chunk_rows), stop)
        self.lhs = zq.to(gemm_dtype)
        self.queue, self.normalize_queue = queue, normalize_queue
        # One flat buffer: a short last chunk still gets a contiguous (n, B) view to write into.
        self.scores = self.lhs.new_empty(self.chunk * batch)
        convert = queue.dtype != gemm_dtype or normalize_queue
        self.rows_buf = self.lhs.new_empty((self.chunk, dim)) if convert else None

    def score(self, start: int, n: int) -> torch.Tensor:
        rows = self.queue[start : start + n]
        if self.normalize_queue:
            # A power of two per row (exact) brings its largest entry into [0.5, 1): the norm can
            # then neither overflow nor underflow, and the score is the cosine whatever the scale.
            biggest = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, dtype=self.lhs.dtype)
            exponent = torch.frexp(biggest).exponent.clamp_(-125, 126)
            rows = torch.mul(rows, torch.ldexp(torch.ones_like(biggest), -exponent)[:, None], out=self.rows_buf[:n])
            norm = torch.linalg.vector_norm(rows, dim=1)
            inv_norm = torch.where(norm == 0, torch.zeros_like(norm), 1 / norm)
        elif self.rows_buf is not None:
            rows = self.rows_buf[:n].copy_(rows)
        sims = self.scores[: n * self.lhs.shape[0]].view(n, -1)
        torch.matmul(rows, self.lhs.T, out=sims)
        if self.normalize_queue:
            sims.mul_(inv_norm[:, None])
        return sims


def _blocks(n: int) -> int:
    """How many blocks _block_max makes of n rows."""
    return n // BLOCK + n % BLOCK


def _block_max(sims: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The (blocks, B) maxima of the chunk's blocks of BLOCK consecutive rows, into ``out``
    (reduced across the middle of a (n / BLOCK, BLOCK, B) view, at memory speed); rows past the
    last full block are blocks of their own."""
    n, batch = sims.shape
    full = n - n % BLOCK
    torch.amax(sims[:full].view(full // BLOCK, BLOCK, batch), dim=1, out=out[: full // BLOCK])
    out[full // BLOCK :] = sims[full:]
    return out


def _block_rows(stop: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row, length) of every block _block_max makes over rows [0, stop) in chunks."""

    def pattern(n):
        full = n - n % BLOCK
        first = torch.cat([torch.arange(0, full, BLOCK, device=device), torch.arange(full, n, device=device)])
        length = torch.where(first < full, BLOCK, 1)
        return first, length

    whole, rest = divmod(stop, chunk)
    first, length = pattern(chunk)
    first = (torch.arange(whole, device=device)[:, None] * chunk + first).reshape(-1)
    length = length.repeat(whole)
    if rest:
        last_first, last_length = pattern(rest)
        first, length = torch.cat([first, last_first + whole * chunk]), torch.cat([length, last_length])
    return first, length


def _search(z, queue, k, valid, ieee, normalize_queue, chunk_rows):
    """(B, k) float64 scores and int64 indices (``_NO_ROW`` for empty slots), best first."""
    zq = _query_operand(z, queue, ieee)
    batch, dim = zq.shape
    num_rows = queue.shape[0]
    host_reads = _host_reads_free(zq.device)
    limit = None
    if valid is None:
        stop = num_rows
    elif not isinstance(valid, torch.Tensor):
        stop = min(max(int(valid), 0), num_rows)
    elif host_reads:
        # In 64 bits: 2^32 + 1 must search every row, not one.
        stop = int(valid.to(torch.int64).clamp(0, num_rows))
    else:
        # Read on the device: rows at or past it are masked instead of skipped.
        stop, limit = num_rows, valid.to(torch.int64).clamp(0, num_rows)
    if stop == 0:
        return (
            torch.full((batch, k), _NEG_INF, dtype=torch.float64, device=zq.device),
            torch.full((batch, k), _NO_ROW, dtype=torch.int64, device=zq.device),
        )
    scorer = _Scorer(zq, queue, stop, _gemm_dtype(zq, queue, ieee, normalize_queue), normalize_queue, chunk_rows)
    if host_reads:
        return _shortlist_search(zq, queue, stop, k, normalize_queue, scorer)
    best_val = torch.full((batch, k), _NEG_INF, dtype=torch.float64, device=zq.device)
    best_idx = torch.full((batch, k), _NO_ROW, dtype=torch.int64, device=zq.device)
    for start in range(0, stop, scorer.chunk):
        sims = scorer.score(start, min(scorer.chunk, stop - start)).T
        _top_computed_chunk(zq, queue, normalize_queue, k, start, sims, limit, best_val, best_idx)
    return best_val, best_idx


def _refilter(zq, queue, owner, cols, floor, slack):
    """Which queue rows of the shortlisted blocks (``cols``: the BLOCK rows of a block per line,
    the block shortlisted for query ``owner``) can still reach ``floor``: their scores recomputed
    in the compute dtype, row by row, cheaper than the float64 re-scoring of whole blocks (after a
    bfloat16 GEMM, whose rounding of the scores made the blocks' bound wide, it also narrows the
    shortlist to a float32 bound). ``slack`` bounds the recomputation's error per query: the
    GEMM's own bound without its output rounding holds for any order of the sum."""
    dim = zq.shape[1]
    keep = torch.empty(cols.shape, dtype=torch.bool, device=zq.device)
    step = max(1, RESCORE_ELEMENTS // (cols.shape[1] * dim))
    for s in range(0, cols.shape[0], step):
        who, where = owner[s : s + step], cols[s : s + step]
        rows = queue.index_select(0, where.reshape(-1)).view(*where.shape, dim)
        # An elementwise product and a sum: a batched matrix-vector product of these small
        # operands took three times as long. The product promotes a 16-bit row exactly.
        scores = (rows * zq.index_select(0, who)[:, None, :]).sum(dim=2).to(torch.float64)
        # NaN scores rank as -inf: they reach only a floor of -inf (infinities stay as they are).
        scores = scores.nan_to_num_(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
        least = floor.index_select(0, who)[:, None]
        keep[s : s + step] = (scores + slack.index_select(0, who)[:, None] >= least) | torch.isneginf(least)
    return keep


def _shortlist_search(zq, queue, stop, k, normalize_queue, scorer):
    """The CPU's search (host reads are free): per chunk only the GEMM, the maxima of its blocks
    of rows and the rows' norms; then one shortlist of every block that can hold one of a
    query's k best, refiltered, and re-scored in float64."""
    batch, dim = zq.shape
    device = zq.device
    starts = list(range(0, stop, scorer.chunk))
    # Row norms in the queue's dtype (a 16-bit norm, accumulated in float32 and rounded once, is
    # ten times cheaper than one asked for in float32; the bound allows for its rounding).
    norms = None if normalize_queue else queue.new_empty(stop)
    # One (blocks, B) buffer: each chunk's maxima are a contiguous slice of it, and -inf rows pad
    # it to whole groups.
    offsets = [0]
    for start in starts:
        offsets.append(offsets[-1] + _blocks(min(scorer.chunk, stop - start)))
    groups = -(-offsets[-1] // GROUP)
    grouped = scorer.lhs.new_empty((groups, GROUP, batch))
    block_max = grouped.view(-1, batch)[: offsets[-1]]
    grouped.view(-1, batch)[offsets[-1] :] = _NEG_INF
    for i, start in enumerate(starts):
        n = min(scorer.chunk, stop - start)
        _block_max(scorer.score(start, n), block_max[offsets[i] : offsets[i + 1]])
        if norms is not None:
            torch.linalg.vector_norm(queue[start : start + n], dim=1, out=norms[start : start + n])
    group_max = grouped.amax(dim=1)
    if bool(torch.isnan(group_max).any()):
        # NaN ranks as -inf: re-scored and cleaned only in the chunks that have some (amax
        # propagated it), so NaN-free data pays nothing.
        for i, start in enumerate(starts):
            if bool(torch.isnan(block_max[offsets[i] : offsets[i + 1]]).any()):
                sims = scorer.score(start, min(scorer.chunk, stop - start))
                sims.nan_to_num_(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
                _block_max(sims, block_max[offsets[i] : offsets[i + 1]])
        group_max = grouped.amax(dim=1)
    row_max = group_max.amax(dim=0)

    # The bound on |computed - exact| per query: slack * ||q|| * R, R the largest finite row norm
    # (rows with Inf or NaN score exactly: inf arithmetic has no rounding).
    if norms is None:
        largest = 1.0
    else:
        finite = torch.isfinite(norms)
        largest = float(torch.where(finite, norms, torch.zeros_like(norms)).amax())
        if norms.dtype != torch.float64:
            # The norm's own rounding: float32's is within the slack, a 16-bit one is not.
            largest *= 1 + 2.0**-7
        overflowed = (~finite).nonzero().squeeze(1)
        if overflowed.numel():
            # A finite row whose squares overflowed (entries beyond ~1e19): its norm in float64.
            rows = queue.index_select(0, overflowed).double()
            rows = rows[torch.isfinite(rows).all(dim=1)]
            if rows.shape[0]:
                largest = max(largest, float(torch.linalg.vector_norm(rows, dim=1).amax()))
    qnorm = torch.linalg.vector_norm(zq, dim=1, dtype=torch.float64).nan_to_num_(nan=0.0)
    gamma, out_unit = _slack(dim, zq.dtype, scorer.lhs.dtype)
    # Flushed subnormals (see the module docstring): at most `tiny` times each input's other
    # operand and `tiny` per product or partial sum.
    flushed = torch.finfo(zq.dtype).tiny * (dim**0.5 * (qnorm + largest) + 2 * dim + 2)
    cauchy_schwarz = qnorm * largest * (1 + gamma) + flushed  # no finite computed score is larger
    # The k-th largest block maximum is a lower bound on the k-th best computed score (k blocks
    # hold a score at least that large each); an exact k-th best lies within the bound of it, so
    # a row can be among the k best only if its computed score reaches `threshold`.
    if k == 1:
        kth = row_max.to(torch.float64)
    elif block_max.shape[0] >= k:
        kth = block_max.topk(k, dim=0).values[-1].to(torch.float64)
    else:
        kth = torch.full((batch,), _NEG_INF, dtype=torch.float64, device=device)
    # A bfloat16 result's rounding scales with the score: only scores between the threshold and
    # the best matter, and none of those exceeds `size`.
    size = torch.minimum(torch.maximum(row_max.to(torch.float64).abs(), kth.abs()) + 2 * (gamma + out_unit) * cauchy_schwarz, cauchy_schwarz)
    bound = gamma * qnorm * largest + flushed + out_unit / (1 - out_unit) * size
    threshold = kth - 2 * bound
    # Compared in the scores' dtype, rounded down so that nothing within the bound is lost.
    rounded = threshold.to(block_max.dtype)
    too_high = rounded.to(torch.float64) > threshold
    rounded = torch.where(too_high, torch.nextafter(rounded, torch.full_like(rounded, _NEG_INF)), rounded)
    # A query with fewer than k blocks above -inf (NaN scores, a NaN query): its -inf rows rank by
    # index, so the first k * (BLOCK + 1) rows hold its k lowest -inf rows whatever its at most
    # k - 1 other blocks take; its -inf blocks (the padding too) are not shortlisted.
    no_floor = torch.isneginf(rounded)
    floorless = no_floor.nonzero().squeeze(1)
    group, owner = (group_max >= rounded).nonzero(as_tuple=True)
    candidates = grouped[group, :, owner]  # (groups hit, GROUP) block maxima of their query
    hit = candidates >= rounded.index_select(0, owner)[:, None]
    if floorless.numel():
        hit &= ~(no_floor.index_select(0, owner)[:, None] & torch.isneginf(candidates))
    which, member = hit.nonzero(as_tuple=True)
    block, owner = group.index_select(0, which) * GROUP + member, owner.index_select(0, which)
    first, length = _block_rows(stop, scorer.chunk, device)
    offsets = torch.arange(BLOCK, device=device)
    cols = first.index_select(0, block)[:, None] + offsets
    keep = offsets < length.index_select(0, block)[:, None]
    if not normalize_queue:
        keep &= _refilter(zq, queue, owner, cols.clamp(max=stop - 1), threshold + bound, gamma * qnorm * largest + flushed)
    owner, cols = owner[:, None].expand_as(cols)[keep], cols[keep]
    if floorless.numel():
        head = torch.arange(min(stop, k * (BLOCK + 1)), device=device)
        owner = torch.cat([owner, floorless.repeat_interleave(head.numel())])
        cols = torch.cat([cols, head.repeat(floorless.numel())])
    # One entry per (query, row), ordered by query then row, as _merge wants them.
    key = torch.unique(owner * stop + cols)
    owner, cols = key // stop, key % stop
    scores = _rescore(zq, queue, normalize_queue, owner, cols)
    counts = torch.bincount(owner, minlength=batch)
    width = max(k, int(counts.max()))
    slot = torch.arange(owner.numel(), device=device) - (counts.cumsum(0) - counts).index_select(0, owner)
    cand_val = torch.full((batch, width), _NEG_INF, dtype=torch.float64, device=device)
    cand_idx = torch.full((batch, width), _NO_ROW, dtype=torch.int64, device=device)
    cand_val[owner, slot] = scores
    cand_idx[owner, slot] = cols
    return _merge(cand_val[:, :0], cand_idx[:, :0], cand_val, cand_idx, k)


def _top_computed_chunk(zq, queue, normalize_queue, k, start, sims, limit, best_val, best_idx):
    """Merge one chunk into the running lists in place, re-scoring each query's ``k +
    SYNC_FREE_EXTRA`` best computed columns; reads nothing on the host."""
    batch, n = sims.shape
    sims.nan_to_num_(nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
    if limit is not None:
        sims.masked_fill_(torch.arange(start, start + n, device=sims.device) >= limit, _NEG_INF)
    take = min(n, k + SYNC_FREE_EXTRA)
    # The `take` best columns, ties at the boundary to the lowest (torch.topk picks arbitrarily
    # among ties; here a real -inf row must beat a masked one): every column above the take-th
    # score, then the lowest equal to it. Ascending, as _merge wants them.
    kth = sims.topk(take, dim=1).values[:, -1:]
    above, tied = sims > kth, sims == kth
    keep = above | (tied & (tied.cumsum(dim=1) <= take - above.sum(dim=1, keepdim=True)))
    col = torch.arange(n, device=sims.device)
    cols = torch.where(keep, col, col + n).topk(take, dim=1, largest=False).values + start
    q_rows = torch.arange(batch, device=zq.device).repeat_interleave(take)
    scores = _rescore(zq, queue, normalize_queue, q_rows, cols.reshape(-1)).view(batch, take)
    if limit is not None:
        masked = cols >= limit
        scores = scores.masked_fill(masked, _NEG_INF)
        cols = cols.masked_fill(masked, _NO_ROW)
    vals, idx = _merge(best_val, best_idx, scores, cols, k)
    best_val.copy_(vals)
    best_idx.copy_(idx)


def torch_nn_topk(
    z: torch.Tensor,
    queue: torch.Tensor,
    k: int,
    valid: int | torch.Tensor | None = None,
    ieee: bool = True,
    normalize_queue: bool = False,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) similarities (float32; float64 for float64 inputs) and int64 indices, best first;
    a slot no searchable row can fill holds (-inf, -1)."""
    vals, idx = _search(z, queue, k, valid, ieee, normalize_queue, chunk_rows)
    return vals.to(compute_dtype(z, queue)), idx.masked_fill_(idx == _NO_ROW, -1)


def torch_nn_lookup(
    z: torch.Tensor,
    queue: torch.Tensor,
    valid: int | torch.Tensor | None = None,
    ieee: bool = True,
    normalize_queue: bool = False,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest rows in z's dtype, int64 indices); -1 and the normalised query where nothing is searchable."""
    _, idx = _search(z, queue, 1, valid, ieee, normalize_queue, chunk_rows)
    idx = idx[:, 0]
    found = idx != _NO_ROW
    idx = idx.masked_fill_(~found, -1)
    rows = queue.index_select(0, idx.clamp_min(0)).to(z.dtype)
    own = _normalized_queries(z, queue).to(z.dtype)
    return torch.where(found[:, None], rows, own), idx
