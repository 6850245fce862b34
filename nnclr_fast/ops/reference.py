"""Naive oracles: what every nnclr_fast op computes, written as plainly as possible.

These are the test oracles and nothing else: no fast path imports them, and they share no code
with the fast paths, so a bug in a fast path cannot hide behind the same bug here. They
materialise the full B x K similarity matrix and loop over rows.

Search semantics (``nn_lookup`` / ``nn_topk``):
  * queries are L2-normalised in float32 (or float64) exactly as ``F.normalize`` does
    (eps = 1e-12, so an all-zero query stays zero and scores 0 against every row);
  * with ``normalize_queue=True`` the queue rows are scored as ``F.normalize(row)`` would be
    (cosine similarity on a bank of raw rows); the row returned is the stored one;
  * only queue rows ``[0, valid)`` are searched (``valid`` clamped to [0, K]);
  * a NaN similarity ranks as ``-inf``: below every real one, still a searchable row;
  * ties go to the lowest queue index, as ``torch.argmax`` does;
  * a top-k slot that no searchable row can fill holds index -1 and score -inf; a lookup with
    nothing searchable returns index -1 and the normalised query itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _scores(z: torch.Tensor, queue: torch.Tensor, valid, precision: str, normalize_queue: bool) -> torch.Tensor:
    dtype = torch.float64 if torch.float64 in (z.dtype, queue.dtype) else torch.float32
    zn = F.normalize(z.to(dtype), dim=1)
    if precision == "default" and queue.dtype in (torch.bfloat16, torch.float16):
        # The tensor cores see the normalised query in the queue's 16-bit dtype; the product of
        # two 16-bit values is exact in float32.
        zn = zn.to(queue.dtype).to(dtype)
    rows = queue[: _valid_rows(queue, valid)].to(dtype)
    if normalize_queue:
        rows = F.normalize(rows, dim=1)
    sims = zn @ rows.T
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
    values = torch.full((batch, k), float("-inf"), dtype=sims.dtype, device=sims.device)
    indices = torch.full((batch, k), -1, dtype=torch.int64, device=sims.device)
    filled = min(k, searchable)
    values[:, :filled] = order_vals[:, :filled]
    indices[:, :filled] = order[:, :filled]
    return values.to(z.device), indices.to(z.device)


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
        own = F.normalize(z.to(sims.dtype), dim=1).to(z.dtype)
        return own, torch.full((z.shape[0],), -1, dtype=torch.int64, device=z.device)
    idx = sims.argmax(dim=1).to(z.device)
    return queue[idx].to(z.dtype), idx


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
    rows = F.normalize(x.float(), dim=1).to(bank.dtype)
    new_bank = bank.clone()
    for i in range(x.shape[0]):
        new_bank[(p + i) % num_slots] = rows[i]
    new_ptr = torch.tensor((p + x.shape[0]) % num_slots, dtype=torch.int64, device=ptr.device)
    new_count = torch.tensor(min(c + x.shape[0], num_slots), dtype=torch.int64, device=count.device)
    return new_bank, new_ptr, new_count
