"""Naive oracles: what every nnclr_fast op computes, written as plainly as possible.

These are the test oracles and nothing else: no fast path imports them, and they share no code
with the fast paths, so a bug in a fast path cannot hide behind the same bug here. They
materialise the full B x K similarity matrix and work in float64.

The contract (``nn_lookup`` / ``nn_topk``):
  * normalisation: a row v becomes ``v / ||v||`` with ``||v||`` computed without overflow or
    underflow, so every finite non-zero row becomes a unit vector whatever its scale (no eps);
    an all-zero row stays all-zero (it scores exactly 0 against every row); a row holding NaN or
    Inf becomes all NaN. Here: in float64, then rounded to float32 (float64 inputs stay float64);
  * queries are normalised; at precision "default" with a bfloat16/float16 queue the normalised
    query is then rounded (to nearest even) to the queue's dtype, as the tensor cores see it;
  * with ``normalize_queue=True`` a queue row scores as its normalised self would (cosine
    similarity on a bank of raw rows); the row returned is the stored one;
  * only queue rows ``[0, valid)`` are searched (``valid`` clamped to [0, K]);
  * a score is the inner product of those operands, here in float64 (exact products, summed in
    index order); a NaN score ranks as ``-inf``: below every number and equal to ``-inf``, the
    row still a candidate, so a NaN row is returned only when no searchable row scores above
    ``-inf``;
  * ties (equal scores) go to the lowest queue index, as ``torch.argmax`` does;
  * a top-k slot that no searchable row can fill holds index -1 and score -inf; a lookup with
    nothing searchable returns index -1 and the normalised query itself.
"""

from __future__ import annotations

import torch


def _normalized(x: torch.Tensor) -> torch.Tensor:
    """Rows of x divided by their L2 norms, in float64; the norm scaled by the row's largest
    magnitude so that it neither overflows nor underflows even for float64 input."""
    x = x.double()
    biggest = x.abs().amax(dim=1, keepdim=True)
    biggest = torch.where(biggest == 0, torch.ones_like(biggest), biggest)
    norm = biggest * (x / biggest).pow(2).sum(dim=1, keepdim=True).sqrt()
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    out = x / norm
    # A row holding NaN or Inf becomes all NaN.
    bad = ~torch.isfinite(x).all(dim=1, keepdim=True)
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def _work_dtype(z: torch.Tensor, queue: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (z.dtype, queue.dtype) else torch.float32


def _scores(z: torch.Tensor, queue: torch.Tensor, valid, precision: str, normalize_queue: bool) -> torch.Tensor:
    zn = _normalized(z).to(_work_dtype(z, queue))
    if precision == "default" and queue.dtype in (torch.bfloat16, torch.float16):
        zn = zn.to(queue.dtype)
    zn = zn.double()
    rows = queue[: _valid_rows(queue, valid)].double()
    if normalize_queue:
        rows = _normalized(rows)
    sims = torch.zeros(zn.shape[0], rows.shape[0], dtype=torch.float64, device=z.device)
    # Column by column, so every score is summed in the same order: identical rows tie exactly.
    for i in range(zn.shape[1]):
        sims += zn[:, i : i + 1] * rows[:, i]
    return torch.where(torch.isnan(sims), torch.full_like(sims, float("-inf")), sims)


def _valid_rows(queue: torch.Tensor, valid) -> int:
    num_rows = queue.shape[0]
    return num_rows if valid is None else min(max(int(valid), 0), num_rows)


def reference_nn_topk(
    z: torch.Tensor,
    queue: torch.Tensor,
    k: int = 1,
    valid: int | torch.Tensor | None = None,
    precision: str = "ieee",
    normalize_queue: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) similarities (float32, float64 for float64 inputs) and int64 indices, best first."""
    sims = _scores(z, queue, valid, precision, normalize_queue)
    batch, searchable = sims.shape
    # A stable descending sort keeps equal scores in index order: ties go to the lowest index.
    order_vals, order = torch.sort(sims, dim=1, descending=True, stable=True)
    values = torch.full((batch, k), float("-inf"), dtype=torch.float64, device=sims.device)
    indices = torch.full((batch, k), -1, dtype=torch.int64, device=sims.device)
    filled = min(k, searchable)
    values[:, :filled] = order_vals[:, :filled]
    indices[:, :filled] = order[:, :filled]
    return values.to(_work_dtype(z, queue)), indices


def reference_nn_lookup(
    z: torch.Tensor,
    queue: torch.Tensor,
    valid: int | torch.Tensor | None = None,
    precision: str = "ieee",
    normalize_queue: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest queue row of every query (in z's dtype) and its int64 index (-1: none searchable)."""
    sims = _scores(z, queue, valid, precision, normalize_queue)
    if sims.shape[1] == 0:
        own = _normalized(z).to(_work_dtype(z, queue)).to(z.dtype)
        return own, torch.full((z.shape[0],), -1, dtype=torch.int64, device=z.device)
    idx = sims.argmax(dim=1)
    return queue[idx].to(z.dtype), idx


def reference_enqueue(
    bank: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FIFO append of ``x``'s normalised rows to a ring buffer; returns new ``(bank, ptr, count)``
    and leaves the inputs untouched (``torch.ops.nnclr_fast.enqueue_`` does the same in place).

    ``bank`` is (K, D), ``ptr`` and ``count`` are 0-dim int64, ``x`` is (B, D) of any float dtype.
    Row i of x is taken as float32 (``x.float()``), normalised as the search contract says (no
    overflow, no eps: unit length for any finite non-zero row, an all-zero row stays zero, a row
    holding NaN or Inf becomes all NaN), rounded to float32, cast to bank's dtype and written at
    ``(ptr + i) % K``, in order; then ``ptr = (ptr + B) % K`` and ``count = min(count + B, K)``.
    A batch larger than K therefore leaves its last K rows.
    """
    num_slots = bank.shape[0]
    p, c = int(ptr), int(count)
    if not 0 <= p < num_slots:
        raise ValueError(f"ptr must be in [0, {num_slots}), got {p}")
    if not 0 <= c <= num_slots:
        raise ValueError(f"count must be in [0, {num_slots}], got {c}")
    rows = _normalized(x.float()).float().to(bank.dtype)
    new_bank = bank.clone()
    for i in range(x.shape[0]):
        new_bank[(p + i) % num_slots] = rows[i]
    new_ptr = torch.tensor((p + x.shape[0]) % num_slots, dtype=torch.int64, device=ptr.device)
    new_count = torch.tensor(min(c + x.shape[0], num_slots), dtype=torch.int64, device=count.device)
    return new_bank, new_ptr, new_count
