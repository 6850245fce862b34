"""Self-check of ``python -m nnclr_fast``: every search and enqueue path on every device against
the oracles in :mod:`nnclr_fast.ops.reference`.

Paths: on a CUDA device the public API (the fused kernel, or the fallback it reports) and the
PyTorch path it falls back to; on the CPU the public API (the PyTorch path, or the Triton kernel
under ``TRITON_INTERPRET=1``) and, when interpreting, the PyTorch path too. Each path is asked
for lookups and top-k at a few shapes (one at the ``--batch`` / ``--dim`` the plans are shown
for), every queue dtype and precision, plus a device-side ``valid``, a raw bank
(``normalize_queue=True``), a queue whose rows TMA cannot describe, and D above 256.

Comparisons are robust to rounding: an index must equal the oracle's where the oracle's margin
over its neighbours is clear (more than twice the tolerance); elsewhere the chosen row's exact
score must be within the precision's tolerance of the oracle's. The tolerances are the API
contract's (README, "Precision"): TF32 and 16-bit scores within 2e-3 / 1.6e-2 / 4e-3, IEEE 1e-5.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nnclr_fast.ops.reference import reference_enqueue, reference_nn_topk

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}
IEEE_TOLERANCE = 1e-5
TOPK = 5


def tolerance(queue_dtype: torch.dtype, ieee: bool) -> float:
    return IEEE_TOLERANCE if ieee else DEFAULT_TOLERANCE[queue_dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class Case:
    """One search problem: shapes and the options that select a kernel variant."""

    batch: int
    rows: int
    dim: int
    queue_dtype: torch.dtype
    ieee: bool
    lookup: bool = True
    valid: Optional[int] = None  # passed as a 0-dim tensor on the device
    normalize_queue: bool = False
    strided_rows: bool = False  # rows one element apart more than D: no TMA descriptor fits

    @property
    def shape(self) -> str:
        return f"B={self.batch} K={self.rows} D={self.dim}"

    @property
    def variant(self) -> tuple[str, ...]:
        """(op, queue dtype, precision, options): how the report groups checks of one shape."""
        options = []
        if self.valid is not None:
            options.append(f"valid={self.valid} tensor")
        if self.normalize_queue:
            options.append("raw bank")
        if self.strided_rows:
            options.append("strided rows")
        return ("lookup" if self.lookup else f"top-{TOPK}", dtype_name(self.queue_dtype),
                "ieee" if self.ieee else "default", " ".join(options) or "plain")


def cases(device: torch.device, batch: int, dim: int, interpreted: bool) -> list[Case]:
    """The problems checked on ``device``: small ones where every call is slow (the interpreter)."""
    small = interpreted or device.type == "cpu"
    main = (min(batch, 20), 700, dim) if small else (batch, 16_384, dim)
    ragged = (9, 301, 40) if small else (37, 3_001, 100)
    wide = (5, 200, 300) if small else (64, 2_048, 384)
    out = []
    for shape in (main, ragged):
        for dtype in DTYPES:
            for ieee in (False, True):
                for lookup in (True, False):
                    out.append(Case(*shape, dtype, ieee, lookup))
    b, k, d = ragged
    out += [
        Case(b, k, d, torch.bfloat16, False, True, valid=k // 3),
        Case(b, k, d, torch.bfloat16, False, False, valid=k // 3),
        Case(b, k, d, torch.float32, False, True, valid=0),
        Case(b, k, d, torch.float32, False, True, normalize_queue=True),
        Case(b, k, d, torch.bfloat16, False, False, normalize_queue=True),
        Case(b, k, d, torch.float32, False, True, strided_rows=True),
        Case(b, k, d, torch.bfloat16, False, False, strided_rows=True),
        Case(*wide, torch.bfloat16, False, True),
        Case(*wide, torch.float32, False, False),
    ]
    return out


def quick_cases(device: torch.device, interpreted: bool) -> list[Case]:
    """One small shape, two variants: for compute-sanitizer's racecheck, which is slow."""
    b, k, d = (9, 301, 40) if interpreted or device.type == "cpu" else (37, 3_001, 100)
    return [Case(b, k, d, torch.bfloat16, False, True), Case(b, k, d, torch.float32, True, False)]


def make_inputs(case: Case, device: torch.device, seed: int):
    """(z, queue, valid) on ``device``; random data (never zeros, which hide unwritten outputs)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(case.batch, case.dim, generator=gen) * 3
    rows = torch.randn(case.rows, case.dim, generator=gen)
    if case.normalize_queue:
        rows = rows * (0.25 + 4 * torch.rand(case.rows, 1, generator=gen))
    else:
        rows = F.normalize(rows, dim=1)
    rows = rows.to(case.queue_dtype)
    if case.strided_rows:
        storage = torch.randn(case.rows, case.dim + 1, generator=gen).to(case.queue_dtype)
        storage[:, : case.dim] = rows
        queue = storage.to(device)[:, : case.dim]
    else:
        queue = rows.to(device)
    valid = None if case.valid is None else torch.tensor(case.valid, device=device)
    return z.to(device), queue, valid


# --------------------------------------------------------------------------------------------
# Comparisons. Each returns None (agrees) or a one-line description of the first disagreement.


def _exact_scores(z, queue, case: Case) -> torch.Tensor:
    """The oracle's score of every searchable row, (B, searchable), in row order."""
    searchable = queue.shape[0] if case.valid is None else min(case.valid, queue.shape[0])
    if searchable == 0:
        return torch.empty(z.shape[0], 0)
    precision = "ieee" if case.ieee else "default"
    vals, idx = reference_nn_topk(z, queue, searchable, valid=case.valid, precision=precision,
                                  normalize_queue=case.normalize_queue)
    return torch.empty_like(vals).scatter_(1, idx, vals)


def _clear(sorted_vals: torch.Tensor, slot: int, tol: float) -> torch.Tensor:
    """Queries whose oracle score at ``slot`` is more than 2*tol from its neighbours' scores."""
    clear = torch.ones(sorted_vals.shape[0], dtype=torch.bool)
    if slot > 0:
        clear &= sorted_vals[:, slot - 1] - sorted_vals[:, slot] > 2 * tol
    if slot + 1 < sorted_vals.shape[1]:
        clear &= sorted_vals[:, slot] - sorted_vals[:, slot + 1] > 2 * tol
    return clear


def compare_lookup(z, queue, out, idx, case: Case) -> Optional[str]:
    z, queue, out, idx = z.cpu(), queue.cpu(), out.cpu(), idx.cpu()
    scores = _exact_scores(z, queue, case)
    if tuple(idx.shape) != (z.shape[0],) or tuple(out.shape) != tuple(z.shape):
        return f"shapes: out {tuple(out.shape)}, idx {tuple(idx.shape)} for z {tuple(z.shape)}"
    if scores.shape[1] == 0:
        if not bool((idx == -1).all()):
            return "nothing is searchable but some index is not -1"
        own = F.normalize(z.float(), dim=1).to(z.dtype)
        if not torch.allclose(out.float(), own.float(), atol=1e-6, rtol=1e-5):
            return "nothing is searchable but the output is not the normalised query"
        return None
    bad = (idx < 0) | (idx >= scores.shape[1])
    if bool(bad.any()):
        q = int(bad.nonzero()[0])
        return f"query {q}: index {int(idx[q])} outside [0, {scores.shape[1]})"
    if not torch.equal(out, queue[idx].to(z.dtype)):
        q = int((out != queue[idx].to(z.dtype)).any(dim=1).nonzero()[0])
        return f"query {q}: the returned row is not queue[{int(idx[q])}]"
    tol = tolerance(case.queue_dtype, case.ieee)
    sorted_vals, order = scores.sort(dim=1, descending=True, stable=True)
    chosen = scores.gather(1, idx[:, None]).squeeze(1)
    wrong = (_clear(sorted_vals, 0, tol) & (idx != order[:, 0])) | (chosen < sorted_vals[:, 0] - tol)
    if bool(wrong.any()):
        q = int(wrong.nonzero()[0])
        return (f"{int(wrong.sum())} of {z.shape[0]} queries; query {q} chose row {int(idx[q])} "
                f"(score {float(chosen[q]):.6f}), the oracle row {int(order[q, 0])} ({float(sorted_vals[q, 0]):.6f}); "
                f"tolerance {tol:g}")
    return None


def compare_topk(z, queue, vals, idx, case: Case) -> Optional[str]:
    z, queue, vals, idx = z.cpu(), queue.cpu(), vals.cpu().float(), idx.cpu()
    scores = _exact_scores(z, queue, case)
    if tuple(idx.shape) != (z.shape[0], TOPK) or tuple(vals.shape) != (z.shape[0], TOPK):
        return f"shapes: values {tuple(vals.shape)}, indices {tuple(idx.shape)}, expected ({z.shape[0]}, {TOPK})"
    filled = min(TOPK, scores.shape[1])
    if not (bool((idx[:, filled:] == -1).all()) and bool(torch.isneginf(vals[:, filled:]).all())):
        return f"slots past the {filled} searchable rows must hold index -1 and score -inf"
    idx, vals = idx[:, :filled], vals[:, :filled]
    if filled == 0:
        return None
    if bool(((idx < 0) | (idx >= scores.shape[1])).any()):
        return f"an index outside [0, {scores.shape[1]})"
    if any(len(set(row)) != filled for row in idx.tolist()):
        return "a query got the same row twice"
    tol = tolerance(case.queue_dtype, case.ieee)
    sorted_vals, order = scores.sort(dim=1, descending=True, stable=True)
    chosen = scores.gather(1, idx)
    for slot in range(filled):
        checks = (
            ((vals[:, slot] - chosen[:, slot]).abs() > tol, "its returned score is not its row's score"),
            ((vals[:, slot] - sorted_vals[:, slot]).abs() > tol, "its score is not the oracle's at that rank"),
            (_clear(sorted_vals, slot, tol) & (idx[:, slot] != order[:, slot]), "a clear winner was missed"),
        )
        for bad, what in checks:
            if bool(bad.any()):
                q = int(bad.nonzero()[0])
                return (f"rank {slot}, {int(bad.sum())} of {z.shape[0]} queries, {what}; query {q}: row {int(idx[q, slot])} "
                        f"score {float(vals[q, slot]):.6f} (exact {float(chosen[q, slot]):.6f}), oracle row "
                        f"{int(order[q, slot])} ({float(sorted_vals[q, slot]):.6f}); tolerance {tol:g}")
    return None


# --------------------------------------------------------------------------------------------
# Paths and the run


@dataclasses.dataclass(frozen=True)
class SearchPath:
    """One way nnclr_fast searches: ``lookup(z, queue, valid, ieee, normalize_queue) -> (out, idx)``,
    ``topk(z, queue, k, valid, ieee, normalize_queue) -> (values, idx)``."""

    label: str
    lookup: Callable
    topk: Callable
    interpreted: bool = False


def _public_lookup(z, queue, valid, ieee, normalize_queue):
    import nnclr_fast

    return nnclr_fast.nn_lookup(z, queue, valid=valid, precision="ieee" if ieee else "default",
                                normalize_queue=normalize_queue, return_indices=True)


def _public_topk(z, queue, k, valid, ieee, normalize_queue):
    import nnclr_fast

    return nnclr_fast.nn_topk(z, queue, k, valid=valid, precision="ieee" if ieee else "default",
                              normalize_queue=normalize_queue)


def search_paths(device: torch.device) -> list[SearchPath]:
    from nnclr_fast.ops.nn_search_torch import torch_nn_lookup, torch_nn_topk
    from nnclr_fast.ops.nn_search_triton import interpreting

    torch_path = SearchPath("PyTorch path", torch_nn_lookup, torch_nn_topk)
    if device.type == "cuda":
        return [SearchPath("nn_lookup / nn_topk (fused kernel)", _public_lookup, _public_topk), torch_path]
    if interpreting():
        return [SearchPath("nn_lookup / nn_topk (Triton interpreter)", _public_lookup, _public_topk, True), torch_path]
    return [SearchPath("nn_lookup / nn_topk (PyTorch path)", _public_lookup, _public_topk)]


@dataclasses.dataclass
class Result:
    device: str
    path: str
    shape: str
    variant: tuple[str, ...]
    error: Optional[str]  # None: agrees with the oracle
    warnings: tuple[str, ...] = ()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_case(path: SearchPath, case: Case, device: torch.device, seed: int) -> Result:
    z, queue, valid = make_inputs(case, device, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.lookup:
                out, idx = path.lookup(z, queue, valid, case.ieee, case.normalize_queue)
                error = compare_lookup(z, queue, out, idx, case)
            else:
                vals, idx = path.topk(z, queue, TOPK, valid, case.ieee, case.normalize_queue)
                error = compare_topk(z, queue, vals, idx, case)
        except Exception as exc:  # noqa: BLE001 - a path that raises fails the check, with why
            error = _first_line(exc)
    seen = tuple(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    return Result(str(device), path.label, case.shape, case.variant, error, seen)


def check_enqueue(device: torch.device, op: Callable, label: str) -> list[Result]:
    """Wrap-around, a batch longer than the bank and a strided x, for every bank dtype."""
    results = []
    gen = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        bank = torch.randn(32, 24, generator=gen).to(device=device, dtype=dtype)
        ptr = torch.tensor(29, device=device)
        count = torch.tensor(30, device=device)
        expected = (bank.cpu().clone(), ptr.cpu().clone(), count.cpu().clone())
        error = None
        try:
            for batch in (5, 13, 40, 7):
                x = torch.randn(batch, 48, generator=gen)[:, ::2]  # strided rows
                expected = reference_enqueue(*expected, x)
                op(bank, ptr, count, x.to(device))
                got = (bank.cpu(), int(ptr), int(count))
                if (got[1], got[2]) != (int(expected[1]), int(expected[2])):
                    error = f"after a batch of {batch}: ptr, count = {got[1:]}, expected {int(expected[1]), int(expected[2])}"
                    break
                atol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
                if not torch.allclose(got[0].float(), expected[0].float(), atol=atol, rtol=0):
                    error = f"after a batch of {batch}: the bank differs from reference_enqueue by more than {atol:g}"
                    break
        except Exception as exc:  # noqa: BLE001
            error = _first_line(exc)
        results.append(Result(str(device), label, "K=32 D=24, batches of 5, 13, 40, 7", ("enqueue", dtype_name(dtype)), error))
    return results


def run(devices: list[torch.device], batch: int, dim: int, quick: bool = False) -> list[Result]:
    """Every check on every device; the caller prints the results."""
    from nnclr_fast.ops import enqueue as enqueue_op

    results = []
    for device in devices:
        for path in search_paths(device):
            todo = quick_cases(device, path.interpreted) if quick else cases(device, batch, dim, path.interpreted)
            for seed, case in enumerate(todo):
                results.append(check_case(path, case, device, seed))
        try:
            backend = enqueue_op.load_extension()
        except Exception as exc:  # noqa: BLE001 - a failed build is this check's failure
            results.append(Result(str(device), "enqueue op", "", ("load the extension",), _first_line(exc)))
            continue
        results += check_enqueue(device, torch.ops.nnclr_fast.enqueue_, f"enqueue op ({backend})")
        if backend != "torch":
            results += check_enqueue(device, enqueue_op.enqueue_torch, "enqueue, PyTorch implementation")
    return results
