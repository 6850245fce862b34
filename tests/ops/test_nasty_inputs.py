"""A hostile sweep: nasty inputs on every search path, checked against an oracle of its own.

Every probe must give the right answer or raise a clear error (one that names the bad argument);
anything else is a silent wrong answer, counted, and the count is the failure.

The oracle is written here, independently of ``nnclr_fast.ops.reference``: float64 brute force,
every score summed coordinate by coordinate in one order (so identical rows score identically).
What "right" means per path (the contract in nnclr_fast.ops.reference):

* the PyTorch path re-scores its shortlist in float64, so its choice is the oracle's: the chosen
  score equals the best to float64 rounding;
* the fused kernel chooses on float32 sums, so its choice is within ``KERNEL_TOL`` (relative to
  the largest score) of the best, and is the oracle's wherever the best is that clear;
* on both, ties go to the lowest index: among rows with exactly equal oracle scores (identical
  rows, exactly representable scores) the lowest comes first; NaN scores rank as -inf; rows at
  or past ``valid`` never appear; unfillable top-k slots hold (-1, -inf); a lookup with nothing
  searchable returns -1 and the normalised query.

Paths: the PyTorch path called directly (the CPU's branch, and the branch that reads nothing on
the host, which GPUs take), and the public API, which on a machine without CUDA runs the fused
kernel in Triton's interpreter (tests/conftest.py) — kept small enough to run in about a minute.
"""

import itertools

import pytest
import torch

import nnclr_fast.ops.nn_search_torch as nn_search_torch
from nnclr_fast import SupportQueue, nn_lookup, nn_topk
from nnclr_fast.ops import enqueue as enqueue_op

NAN, INF = float("nan"), float("inf")
TORCH_TOL = 1e-9
KERNEL_TOL = 5e-5
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
LOW = (BF16, F16)


# ------------------------------------------------------------------------------------------
# The oracle


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| in float64 (squares of float32 values neither overflow nor underflow there);
    zero rows stay zero, rows with NaN or Inf become NaN."""
    x = x.double()
    norm = x.pow(2).sum(dim=1, keepdim=True).sqrt()
    out = torch.where(norm == 0, torch.zeros_like(x), x / norm)
    return torch.where(torch.isfinite(x).all(dim=1, keepdim=True), out, torch.full_like(out, NAN))


def searchable(queue, valid) -> int:
    return queue.shape[0] if valid is None else max(0, min(int(valid), queue.shape[0]))


def oracle(z, queue, valid, precision, normalize_queue):
    """(B, S) float64 scores of the searchable rows (NaN as -inf) and the normalised queries."""
    zn = unit_rows(z).float()
    if precision == "default" and queue.dtype in LOW:
        zn = zn.to(queue.dtype)
    zn = zn.double()
    rows = queue[: searchable(queue, valid)].double()
    if normalize_queue:
        rows = unit_rows(rows)
    scores = torch.zeros(z.shape[0], rows.shape[0], dtype=torch.float64)
    for i in range(z.shape[1]):
        scores += zn[:, i : i + 1] * rows[:, i]
    return scores.nan_to_num(nan=-INF, posinf=INF, neginf=-INF), unit_rows(z).float()


# ------------------------------------------------------------------------------------------
# What a right answer is


def check_topk(scores, vals, idx, k, tol):
    """Problems with a (B, k) answer against the oracle's scores, as strings."""
    problems = []
    count = scores.shape[1]
    if vals.shape != (scores.shape[0], k) or idx.shape != (scores.shape[0], k):
        return [f"shape {tuple(vals.shape)}/{tuple(idx.shape)}, wanted ({scores.shape[0]}, {k})"]
    finite = scores[torch.isfinite(scores)]
    slack = tol * (max(1.0, float(finite.abs().max())) if finite.numel() else 1.0)
    for b in range(scores.shape[0]):
        row, got, got_val = scores[b].tolist(), idx[b].tolist(), vals[b].double().tolist()
        filled = min(k, count)
        if any(i != -1 for i in got[filled:]) or any(v != -INF for v in got_val[filled:]):
            problems.append(f"query {b}: slots past {filled} searchable rows not (-1, -inf): {got}")
            continue
        got, got_val = got[:filled], got_val[:filled]
        if any(not 0 <= i < count for i in got) or len(set(got)) != filled:
            problems.append(f"query {b}: indices {got} not distinct rows of [0, {count})")
            continue
        order = sorted(range(count), key=lambda j: (-row[j], j))
        chosen, best = [row[j] for j in got], [row[j] for j in order[:filled]]
        if any(c < w - slack and not c == w == -INF for c, w in zip(chosen, best)):
            problems.append(f"query {b}: scores {chosen} below the best {best}")
            continue
        if count > 1 and row[order[0]] - row[order[1]] > 2 * slack and got[0] != order[0]:
            problems.append(f"query {b}: the clear best is row {order[0]}, got row {got[0]}")
        # Ties to the lowest index: a lower row with exactly the same score as a chosen one must be
        # chosen too, and earlier.
        for slot, j in enumerate(got):
            tied = [i for i in range(j) if row[i] == row[j] and (i not in got or got.index(i) > slot)]
            if tied:
                problems.append(f"query {b}: row {j} chosen before or instead of row {tied[0]}, which scores the same")
                break
        for v, c in zip(got_val, chosen):
            if (v != c) if not (abs(c) < INF) else not abs(v - c) <= max(slack, 1e-6 * abs(c), 1e-7):
                problems.append(f"query {b}: values {got_val} for scores {chosen}")
                break
    return problems


def check_lookup(scores, own, z, queue, out, idx, tol):
    # A lookup returns no score: the index is checked with the oracle's score standing in.
    own_scores = [scores[b, i].item() if 0 <= i < scores.shape[1] else -INF for b, i in enumerate(idx.tolist())]
    problems = check_topk(scores, torch.tensor(own_scores, dtype=torch.float64)[:, None], idx[:, None], 1, tol)
    if out.dtype != z.dtype or out.shape != z.shape:
        return problems + [f"output {out.dtype} {tuple(out.shape)}"]
    for b, i in enumerate(idx.tolist()):
        want = queue[i].to(z.dtype) if i >= 0 else own[b].to(z.dtype)
        same = torch.equal(out[b].isnan(), want.isnan()) and (
            torch.equal(out[b].nan_to_num(0.0), want.nan_to_num(0.0))
            if i >= 0
            else torch.allclose(out[b].float().nan_to_num(0.0), want.float().nan_to_num(0.0), atol=0, rtol=2 * torch.finfo(z.dtype).eps)
        )
        if not same:
            problems.append(f"query {b}: output row is not {'queue row ' + str(i) if i >= 0 else 'the normalised query'}")
    return problems


# ------------------------------------------------------------------------------------------
# The grid


def make_case(kind, B, K, D, z_dtype, q_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    if kind == "duplicates" and K >= 4:
        queue[1:K:3] = queue[0]
        z = queue[0] + 0.3 * torch.randn(B, D, generator=g)
    elif kind == "integers":
        z = torch.nn.functional.one_hot(torch.randint(0, D, (B,), generator=g), D).float() * 3
        queue = torch.randint(-2, 3, (K, D), generator=g).float()
    elif kind == "nan":
        queue[:: max(1, K // 3)] = NAN
        z[0, 0] = NAN
    elif kind == "inf":
        queue[K // 2, 0] = INF
        queue[-1, -1] = -INF
        z[-1, 0] = INF
    elif kind == "zeros":
        queue[::2] = 0
        z[0] = 0
    elif kind == "scales":
        scale = torch.tensor([1e-30, 1e-20, 1e20, 1e30])
        queue = queue * scale[torch.arange(K) % 4][:, None]
        z = z * scale[torch.arange(B) % 4][:, None]
    elif kind == "all_nan":
        queue[:] = NAN
    return z.to(z_dtype), queue.to(q_dtype)


KINDS = ["random", "duplicates", "integers", "nan", "inf", "zeros", "scales", "all_nan"]
SHAPES = [(1, 1, 1), (3, 1, 8), (1, 7, 5), (5, 33, 16), (7, 70, 40), (4, 130, 24), (2, 40, 300)]
DTYPES = [(F32, F32), (BF16, BF16), (F32, BF16), (BF16, F32), (F16, F16), (F32, F16)]


def valids(K):
    """valid at and past every boundary: None, ints in [1, K], 0-dim tensors anywhere."""
    out = [None, K, max(1, K - 1), 1]
    out += [torch.tensor(v) for v in (0, 1, K - 1, K, K + 1, 2**31, 2**32 + 1)]
    out += [torch.tensor(min(K, 3), dtype=torch.int32), torch.tensor(min(K, 200), dtype=torch.uint8)]
    return out


def probes(max_dim=None, max_rows=None, every=1):
    """Deterministic grid: every kind and shape, the other options rotated through."""
    options = itertools.cycle(itertools.product(DTYPES, ("default", "ieee"), (False, True)))
    out = []
    for n, ((B, K, D), kind) in enumerate(itertools.product(SHAPES, KINDS)):
        if (max_dim and D > max_dim) or (max_rows and K > max_rows):
            continue
        vs = valids(K)
        for j, valid in enumerate(vs):
            (z_dtype, q_dtype), precision, normalize_queue = next(options)
            if (n + j) % every:
                continue
            if isinstance(valid, int) and valid < 1:
                continue
            k = [1, 3, 5, 17][(n + j) % 4]
            out.append((kind, B, K, D, z_dtype, q_dtype, precision, normalize_queue, valid, k, 1000 * n + j))
    return out


def run_probe(lookup, topk, tol, probe):
    kind, B, K, D, z_dtype, q_dtype, precision, normalize_queue, valid, k, seed = probe
    z, queue = make_case(kind, B, K, D, z_dtype, q_dtype, seed)
    scores, own = oracle(z, queue, valid, precision, normalize_queue)
    count = scores.shape[1]
    problems = []
    out, idx = lookup(z, queue, valid, precision, normalize_queue)
    problems += check_lookup(scores, own, z, queue, out, idx, tol)
    # k may not exceed the rows an int valid leaves, nor K with a tensor valid (the API's rule).
    k = min(k, count if isinstance(valid, int) or valid is None else K)
    vals, top = topk(z, queue, k, valid, precision, normalize_queue)
    problems += check_topk(scores, vals, top, k, tol)
    return problems


def sweep(lookup, topk, tol, grid):
    wrong = []
    for probe in grid:
        try:
            problems = run_probe(lookup, topk, tol, probe)
        except (ValueError, TypeError) as exc:
            problems = [f"raised on a valid input: {exc}"]
        wrong += [f"{probe[:10]}: {p}" for p in problems]
    assert not wrong, f"{len(wrong)} silent wrong answers in {len(grid)} probes:\n" + "\n".join(wrong[:25])


# ------------------------------------------------------------------------------------------
# The paths


def torch_lookup(z, queue, valid, precision, normalize_queue):
    return nn_search_torch.torch_nn_lookup(z, queue, valid, precision == "ieee", normalize_queue, chunk_rows=16)


def torch_topk(z, queue, k, valid, precision, normalize_queue):
    return nn_search_torch.torch_nn_topk(z, queue, k, valid, precision == "ieee", normalize_queue, chunk_rows=16)


def api_lookup(z, queue, valid, precision, normalize_queue):
    return nn_lookup(z, queue, valid=valid, precision=precision, normalize_queue=normalize_queue, return_indices=True)


def api_topk(z, queue, k, valid, precision, normalize_queue):
    return nn_topk(z, queue, k, valid=valid, precision=precision, normalize_queue=normalize_queue)


def test_pytorch_path():
    sweep(torch_lookup, torch_topk, TORCH_TOL, probes())


def test_pytorch_path_without_host_reads(monkeypatch):
    monkeypatch.setattr(nn_search_torch, "_host_reads_free", lambda device: False)
    # No shortlist bound here: exact while a chunk holds at most SYNC_FREE_EXTRA + k rows within
    # the rounding of the best, which these small chunks always do.
    sweep(torch_lookup, torch_topk, TORCH_TOL, probes())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, on the NaN and Inf inputs
def test_public_api_fused_kernel():
    # Under the interpreter the kernel scores in float32 (no TF32), so KERNEL_TOL holds for
    # "default" too; k > 16 takes the PyTorch path.
    sweep(api_lookup, api_topk, KERNEL_TOL, probes(max_rows=70, every=3) + probes(max_dim=300, every=17))


# ------------------------------------------------------------------------------------------
# Bad arguments and corrupted queue state: a clear error, nothing changed


def clear_error_cases():
    z, queue = torch.randn(4, 8), torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    return [
        ("valid int 0", lambda: nn_lookup(z, queue, valid=0), "valid"),
        ("valid int K+1", lambda: nn_lookup(z, queue, valid=11), "valid"),
        ("valid int 2^32+1", lambda: nn_topk(z, queue, 1, valid=2**32 + 1), "valid"),
        ("valid negative", lambda: nn_lookup(z, queue, valid=-1), "valid"),
        ("valid float tensor", lambda: nn_lookup(z, queue, valid=torch.tensor(3.0)), "valid"),
        ("valid 1-element tensor", lambda: nn_lookup(z, queue, valid=torch.tensor([3])), "valid"),
        ("valid bool", lambda: nn_lookup(z, queue, valid=True), "valid"),
        ("k 0", lambda: nn_topk(z, queue, 0), "k"),
        ("k past valid", lambda: nn_topk(z, queue, 5, valid=4), "k"),
        ("k past K", lambda: nn_topk(z, queue, 11), "k"),
        ("z 1-D", lambda: nn_lookup(z[0], queue), "z"),
        ("queue 3-D", lambda: nn_lookup(z, queue[None]), "queue"),
        ("D mismatch", lambda: nn_lookup(z[:, :7], queue), "feature dim"),
        ("empty z", lambda: nn_lookup(z[:0], queue), "z"),
        ("empty queue", lambda: nn_lookup(z, queue[:0]), "queue"),
        ("integer queue", lambda: nn_lookup(z, queue.long()), "queue"),
        ("precision", lambda: nn_lookup(z, queue, precision="fast"), "precision"),
        ("z on meta", lambda: nn_lookup(z.to("meta"), queue), "device"),
    ]


def corrupted_state_cases():
    def load(key, value):
        queue = SupportQueue(6, 3)
        state = {"bank": torch.zeros(6, 3), "ptr": torch.tensor(2), "count": torch.tensor(2)}
        state[key] = value
        return lambda: queue.load_state_dict(state)

    def enqueue(fn, ptr, count):
        return lambda: fn(torch.zeros(6, 3), torch.tensor(ptr), torch.tensor(count), torch.randn(2, 3))

    op = (enqueue_op.load_extension(), torch.ops.nnclr_fast.enqueue_)[1]
    cases = [(f"load {key}={value!r}", load(key, value), key) for key, value in [
        ("ptr", torch.tensor(10**9)), ("ptr", torch.tensor(-1)), ("ptr", torch.tensor(-(2**63))),
        ("ptr", torch.tensor(NAN)), ("ptr", torch.tensor([2])), ("ptr", torch.tensor(4)),
        ("count", torch.tensor(7)), ("count", torch.tensor(-2)), ("count", torch.tensor(2.0)),
        ("bank", torch.zeros(5, 3)), ("bank", torch.zeros(6, 3, dtype=torch.float64)), ("bank", [[0.0] * 3] * 6),
    ]]
    for name, fn in (("op", op), ("fallback", enqueue_op.enqueue_torch)):
        for ptr, count in ((6, 6), (-1, 2), (10**9, 6), (0, 7), (0, -5)):
            cases.append((f"enqueue {name} ptr={ptr} count={count}", enqueue(fn, ptr, count), "ptr" if not 0 <= ptr < 6 else "count"))
    return cases


def test_bad_arguments_and_corrupted_state_raise_clear_errors():
    silent = []
    for name, call, word in clear_error_cases() + corrupted_state_cases():
        try:
            call()
        except (ValueError, TypeError, RuntimeError) as exc:
            if word not in str(exc):
                silent.append(f"{name}: unclear error {exc!r}")
        else:
            silent.append(f"{name}: accepted")
    assert not silent, f"{len(silent)} bad inputs without a clear error:\n" + "\n".join(silent)
