"""Plain-PyTorch definitions of every nnclr_fast kernel.

These functions *are* the semantics: the Triton kernels and the C++/CUDA ops are tested against
them, and the chunked functions double as the CPU implementation (bounded memory: they never hold
the full B x K similarity matrix).

Search semantics shared by every path:
  * queries are L2-normalised in float32 exactly as ``F.normalize`` does (eps = 1e-12, so an
    all-zero query stays zero and scores 0 against every row);
  * only queue rows ``[0, valid)`` are searched;
  * a NaN similarity ranks as ``-inf`` (it never beats a real one);
  * ties go to the lowest queue index, as ``torch.argmax`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALIZE_EPS = 1e-12

# Queue rows scored per chunk by the chunked CPU path: B x CHUNK float32 scores stay small
# (B=1024 -> 32 MiB) whatever K is.
DEFAULT_CHUNK_ROWS = 8192


def compute_dtype(z: torch.Tensor) -> torch.dtype:
    """float32 accumulation; float64 inputs (CPU only, used by gradcheck) stay float64."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def normalize_queries(z: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation in float32, identical to ``F.normalize(z.float(), dim=1)``."""
    return F.normalize(z.to(compute_dtype(z)), dim=1, eps=NORMALIZE_EPS)


def normalize_backward(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of :func:`normalize_queries` at ``z``, returned in z's dtype.

    This is the straight-through gradient: d/dz of ``F.normalize(z) + (nn - F.normalize(z)).detach()``.
    """
    zc = z.to(compute_dtype(z))
    norm = zc.norm(dim=1, keepdim=True)
    denom = norm.clamp_min(NORMALIZE_EPS)
    y = zc / denom
    g = grad.to(zc.dtype)
    # Above eps the Jacobian is (I - y y^T) / ||z||; at or below eps F.normalize divides by the
    # constant eps, whose Jacobian is I / eps.
    projected = g - y * (y * g).sum(dim=1, keepdim=True)
    grad_z = torch.where(norm > NORMALIZE_EPS, projected, g) / denom
    return grad_z.to(z.dtype)


def _search_operands(z: torch.Tensor, queue: torch.Tensor, precision: str):
    """float32 operands of the similarity matmul, rounded as the kernel rounds them.

    With precision="default" and a 16-bit queue the kernel feeds the normalised query to the
    tensor cores in the queue's dtype, so the reference rounds it the same way (the products of
    two 16-bit values are exact in float32). float32 queues are compared in exact float32 here;
    the kernel's TF32 default is checked against this within TF32's tolerance.
    """
    zn = normalize_queries(z)
    if precision == "default" and queue.dtype in (torch.bfloat16, torch.float16):
        zn = zn.to(queue.dtype).float()
    return zn, queue


def _scores(zn: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    sims = zn @ rows.to(zn.dtype).T
    return sims.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def reference_nn_topk(
    z: torch.Tensor,
    queue: torch.Tensor,
    k: int = 1,
    valid: int | None = None,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) float32 similarities and int64 indices, best first, by materialising B x valid."""
    valid = queue.shape[0] if valid is None else int(valid)
    zn, q = _search_operands(z, queue, precision)
    sims = _scores(zn, q[:valid])
    # A stable descending sort keeps equal scores in index order: ties go to the lowest index.
    values, order = torch.sort(sims, dim=1, descending=True, stable=True)
    return values[:, :k].contiguous(), order[:, :k].contiguous()


def reference_nn_lookup(
    z: torch.Tensor,
    queue: torch.Tensor,
    valid: int | None = None,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest queue row of every query (in z's dtype) and its int64 index: normalise, matmul,
    argmax, gather."""
    valid = queue.shape[0] if valid is None else int(valid)
    zn, q = _search_operands(z, queue, precision)
    idx = _scores(zn, q[:valid]).argmax(dim=1)
    return queue.index_select(0, idx).to(z.dtype), idx


def _topk_lowest_index(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of ``sims``, best first, ties to the lowest column, without sorting rows.

    ``torch.topk`` finds the k-th best score but orders ties arbitrarily, so the winners are
    rebuilt: every score above the k-th, then the lowest-column scores equal to it. No host sync.
    """
    k = min(k, sims.shape[1])
    vals, cols = sims.topk(k, dim=1)
    kth = vals[:, -1:]
    if sims.device.type == "cpu" and not bool(((sims >= kth).sum(dim=1) > k).any()):
        # Common case: no tie straddles the k-th place, so topk picked the right set and only
        # the order of equal scores inside it needs fixing (a host check is free on the CPU).
        by_col = cols.argsort(dim=1)
        vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
        order = vals.argsort(dim=1, descending=True, stable=True)
        return vals.gather(1, order), cols.gather(1, order)
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


def _chunk_scores(zn: torch.Tensor, q: torch.Tensor, valid, chunk_rows: int):
    """Yield (first row, scores of rows [first, first + chunk_rows)) over the searchable rows.

    An int ``valid`` stops the scan early; a 0-dim tensor masks rows at or past it to -inf on
    the device instead, so reading it never syncs the host.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    num_rows = q.shape[0]
    masked = isinstance(valid, torch.Tensor)
    stop = num_rows if masked or valid is None else min(int(valid), num_rows)
    for start in range(0, stop, chunk_rows):
        end = min(start + chunk_rows, stop)
        sims = _scores(zn, q[start:end])
        if masked:
            sims = sims.masked_fill(torch.arange(start, end, device=zn.device) >= valid, float("-inf"))
        yield start, sims


def chunked_nn_topk(
    z: torch.Tensor,
    queue: torch.Tensor,
    k: int,
    valid: int | torch.Tensor | None = None,
    precision: str = "ieee",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`reference_nn_topk`, scoring at most ``chunk_rows`` queue rows at a time.

    ``valid`` may be a 0-dim tensor: rows at or past it are masked on the device, so reading it
    never syncs the host (all chunks are scored; the mask costs nothing extra).
    """
    zn, q = _search_operands(z, queue, precision)
    best_vals = zn.new_full((zn.shape[0], 0), float("-inf"))
    best_idx = torch.empty((zn.shape[0], 0), dtype=torch.int64, device=zn.device)
    for start, sims in _chunk_scores(zn, q, valid, chunk_rows):
        chunk_vals, chunk_cols = _topk_lowest_index(sims, k)
        # Both halves are ordered (score desc, index asc) and every running index is below this
        # chunk's, so one stable sort of their concatenation keeps ties on the lowest index.
        vals = torch.cat([best_vals, chunk_vals], dim=1)
        idx = torch.cat([best_idx, chunk_cols + start], dim=1)
        order = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
        best_vals, best_idx = vals.gather(1, order), idx.gather(1, order)
    return best_vals, best_idx


def chunked_nn_lookup(
    z: torch.Tensor,
    queue: torch.Tensor,
    valid: int | torch.Tensor | None = None,
    precision: str = "ieee",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`reference_nn_lookup` with memory bounded by ``chunk_rows``."""
    zn, q = _search_operands(z, queue, precision)
    best_val = zn.new_full((zn.shape[0],), float("-inf"))
    best_idx = torch.zeros(zn.shape[0], dtype=torch.int64, device=zn.device)
    for start, sims in _chunk_scores(zn, q, valid, chunk_rows):
        # max() returns the first maximal index and the strict '>' keeps earlier chunks on
        # ties, so ties go to the lowest index as with torch.argmax.
        chunk_val, chunk_idx = sims.max(dim=1)
        better = chunk_val > best_val
        best_val = torch.where(better, chunk_val, best_val)
        best_idx = torch.where(better, chunk_idx + start, best_idx)
    return queue.index_select(0, best_idx).to(z.dtype), best_idx


def reference_enqueue(
    bank: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FIFO append of ``x``'s normalised rows to a ring buffer; returns new ``(bank, ptr, count)``
    and leaves the inputs untouched (``torch.ops.nnclr_fast.enqueue_`` does the same in place).

    ``bank`` is (K, D), ``ptr`` and ``count`` are 0-dim int64, ``x`` is (B, D) of any float dtype.
    Row i of x is normalised in float32 (``F.normalize(x.float())``, eps = 1e-12), cast to bank's
    dtype and written at ``(ptr + i) % K``, in order; then ``ptr = (ptr + B) % K`` and
    ``count = min(count + B, K)``. A batch larger than K therefore leaves its last K rows.
    """
    num_slots = bank.shape[0]
    p, c = int(ptr), int(count)
    if not 0 <= p < num_slots:
        raise ValueError(f"ptr must be in [0, {num_slots}), got {p}")
    if not 0 <= c <= num_slots:
        raise ValueError(f"count must be in [0, {num_slots}], got {c}")
    rows = F.normalize(x.float(), dim=1, eps=NORMALIZE_EPS).to(bank.dtype)
    new_bank = bank.clone()
    for i in range(x.shape[0]):
        new_bank[(p + i) % num_slots] = rows[i]
    new_ptr = torch.tensor((p + x.shape[0]) % num_slots, dtype=torch.int64, device=ptr.device)
    new_count = torch.tensor(min(c + x.shape[0], num_slots), dtype=torch.int64, device=count.device)
    return new_bank, new_ptr, new_count
