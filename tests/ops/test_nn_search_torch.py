"""The chunked plain-PyTorch path (what CPU tensors run outside the interpreter), against the oracle.

Exact equality is asserted only where every score is exactly representable whatever the GEMM's
summation order (one-hot queries, small-integer queues); with random floats, indices are compared
only where the oracle's top-2 gap is clear, elsewhere the chosen row's exact score must be within
tolerance of the best.
"""

import pytest
import torch
import torch.nn.functional as F

import nnclr_fast.ops.nn_search_torch as nn_search_torch
import nnclr_fast.ops.nn_search_triton as nn_search_triton
from nnclr_fast import nn_lookup, nn_topk
from nnclr_fast.ops.nn_search_torch import torch_nn_lookup, torch_nn_topk
from nnclr_fast.ops.reference import reference_nn_lookup, reference_nn_topk

NAN = float("nan")
INF = float("inf")


def inputs(B, K, D, q_dtype=torch.float32):
    return torch.randn(B, D), F.normalize(torch.randn(K, D), dim=1).to(q_dtype)


def integer_inputs(B, K, D, seed=0):
    """One-hot queries (times 3) and a small-integer queue: every score is exact, ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    z = F.one_hot(torch.randint(0, D, (B,), generator=gen), D).float() * 3
    queue = torch.randint(-2, 3, (K, D), generator=gen).float()
    return z, queue


def exact_scores(z, queue, normalize_queue=False):
    zn = F.normalize(z.double(), dim=1)
    rows = queue.double()
    if normalize_queue:
        rows = F.normalize(rows, dim=1)
    return zn @ rows.T


def assert_lookup_close(z, queue, idx, normalize_queue=False, atol=1e-5):
    """Indices equal the oracle's where its top-2 gap is clear; every chosen row scores within
    ``atol`` of the best (scores recomputed in float64)."""
    exact = exact_scores(z, queue, normalize_queue)
    top2 = exact.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    best = exact.argmax(dim=1)
    assert torch.equal(idx[clear], best[clear])
    chosen = exact.gather(1, idx[:, None])[:, 0]
    assert (chosen >= top2[:, 0] - atol).all()


# --------------------------------------------------------------------------------------------
# Exact agreement with the oracle


@pytest.mark.parametrize("chunk_rows", [1, 5, 7, 64, 10_000])
@pytest.mark.parametrize("k", [1, 4, 30])
def test_topk_matches_reference_exactly(chunk_rows, k):
    # Small-integer entries make ties everywhere, spread over many chunks (7 and 64 do not divide 90).
    z, queue = integer_inputs(6, 90, 12)
    vals, idx = torch_nn_topk(z, queue, k, chunk_rows=chunk_rows)
    ref_vals, ref_idx = reference_nn_topk(z, queue, k)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(vals, ref_vals)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_lookup_matches_reference_exactly(chunk_rows, q_dtype):
    z, queue = integer_inputs(13, 150, 20)
    queue = queue.to(q_dtype)
    for ieee in (True, False):
        precision = "ieee" if ieee else "default"
        out, idx = torch_nn_lookup(z, queue, ieee=ieee, chunk_rows=chunk_rows)
        ref_out, ref_idx = reference_nn_lookup(z, queue, precision=precision)
        assert torch.equal(idx, ref_idx)
        assert torch.equal(out, ref_out)
        assert out.dtype == z.dtype


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 8192])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_lookup_random_floats(chunk_rows, q_dtype):
    z, queue = inputs(13, 150, 20, q_dtype)
    out, idx = torch_nn_lookup(z, queue, chunk_rows=chunk_rows)
    assert_lookup_close(z, queue, idx)
    assert torch.equal(out, queue[idx].to(z.dtype))
    _, top = torch_nn_topk(z, queue, 5, chunk_rows=chunk_rows)
    assert torch.equal(top[:, 0], idx)


def test_ieee_false_rounds_query_to_a_16bit_queue():
    z, queue = inputs(32, 400, 24, torch.bfloat16)
    for ieee, precision in ((True, "ieee"), (False, "default")):
        _, idx = torch_nn_lookup(z, queue, ieee=ieee, chunk_rows=64)
        zq = F.normalize(z, dim=1)
        if not ieee:
            zq = zq.bfloat16().float()
        assert_lookup_close(zq, queue, idx)
        ref_vals, _ = reference_nn_topk(z, queue, 1, precision=precision)
        vals, _ = torch_nn_topk(z, queue, 1, ieee=ieee, chunk_rows=64)
        torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# normalize_queue: raw rows scored by cosine, the stored row returned


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_normalize_queue_exact(chunk_rows):
    # Integer rows of different lengths: their raw inner products would rank by length too.
    z, queue = integer_inputs(9, 60, 6, seed=3)
    queue[5] = 0  # an all-zero row scores 0 (F.normalize's eps), as the oracle's
    out, idx = torch_nn_lookup(z, queue, normalize_queue=True, chunk_rows=chunk_rows)
    ref_out, ref_idx = reference_nn_lookup(z, queue, normalize_queue=True)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(out, ref_out)  # the raw, stored row
    vals, idx = torch_nn_topk(z, queue, 7, normalize_queue=True, chunk_rows=chunk_rows)
    ref_vals, ref_idx = reference_nn_topk(z, queue, 7, normalize_queue=True)
    # Scores are row / ||row|| in float32: equal to the oracle's up to the dot product's rounding.
    torch.testing.assert_close(vals, ref_vals, atol=1e-6, rtol=0)
    assert (vals[:, :-1] >= vals[:, 1:]).all()


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_normalize_queue_random_raw_rows(q_dtype):
    z = torch.randn(16, 32)
    queue = (torch.randn(500, 32) * torch.rand(500, 1) * 10).to(q_dtype)
    out, idx = torch_nn_lookup(z, queue, normalize_queue=True, chunk_rows=37)
    assert_lookup_close(z, queue, idx, normalize_queue=True)
    assert torch.equal(out, queue[idx].to(z.dtype))
    # The raw inner product would pick other rows: the test is not vacuous.
    assert not torch.equal(idx, (F.normalize(z, dim=1) @ queue.float().T).argmax(dim=1))
    vals, top = torch_nn_topk(z, queue, 5, normalize_queue=True, chunk_rows=37)
    ref_vals, _ = reference_nn_topk(z, queue, 5, normalize_queue=True)
    torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=0)
    assert torch.equal(top[:, 0], idx)


# --------------------------------------------------------------------------------------------
# valid: int or 0-dim tensor (masked, clamped to [0, K])


@pytest.mark.parametrize("chunk_rows", [1, 16, 1000])
def test_tensor_valid_matches_reference(chunk_rows):
    z, queue = integer_inputs(5, 100, 8, seed=1)
    for valid in (1, 33, 100, 250):
        for v in (valid, torch.tensor(valid)):
            out, idx = torch_nn_lookup(z, queue, valid=v, chunk_rows=chunk_rows)
            ref_out, ref_idx = reference_nn_lookup(z, queue, valid=valid)
            assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)
            vals, top = torch_nn_topk(z, queue, 3, valid=v, chunk_rows=chunk_rows)
            ref_vals, ref_top = reference_nn_topk(z, queue, 3, valid=valid)
            assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)
            assert (top < min(valid, 100)).all()


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_tensor_valid_zero_or_negative(chunk_rows):
    z, queue = inputs(4, 20, 8)
    for valid in (torch.tensor(0), torch.tensor(-3), torch.tensor(0, dtype=torch.int32)):
        out, idx = torch_nn_lookup(z, queue, valid=valid, chunk_rows=chunk_rows)
        assert torch.equal(idx, torch.full((4,), -1))
        assert torch.equal(out, F.normalize(z, dim=1))
        vals, top = torch_nn_topk(z, queue, 5, valid=valid, chunk_rows=chunk_rows)
        assert torch.equal(top, torch.full((4, 5), -1))
        assert torch.equal(vals, torch.full((4, 5), -INF))


@pytest.mark.parametrize("chunk_rows", [1, 2, 64])
def test_tensor_valid_below_k(chunk_rows):
    z, queue = integer_inputs(6, 40, 5, seed=2)
    vals, idx = torch_nn_topk(z, queue, 5, valid=torch.tensor(3), chunk_rows=chunk_rows)
    ref_vals, ref_idx = reference_nn_topk(z, queue, 5, valid=3)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    assert torch.equal(idx[:, 3:], torch.full((6, 2), -1))
    assert torch.equal(vals[:, 3:], torch.full((6, 2), -INF))
    assert torch.equal(idx[:, :3].sort(dim=1).values, torch.arange(3).expand(6, 3))


def test_int_valid_zero_on_the_cpu_path():
    # The wrapper rejects an int valid < 1; called directly the path means "nothing searchable".
    z, queue = inputs(3, 10, 4)
    out, idx = torch_nn_lookup(z, queue, valid=0)
    assert torch.equal(idx, torch.full((3,), -1)) and torch.equal(out, F.normalize(z, dim=1))
    vals, top = torch_nn_topk(z, queue, 2, valid=0)
    assert torch.equal(top, torch.full((3, 2), -1)) and torch.equal(vals, torch.full((3, 2), -INF))


def test_k_above_searchable_rows():
    z, queue = integer_inputs(3, 4, 6)
    vals, idx = torch_nn_topk(z, queue, 7, chunk_rows=3)
    ref_vals, ref_idx = reference_nn_topk(z, queue, 7)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    assert torch.equal(idx[:, 4:], torch.full((3, 3), -1))


# --------------------------------------------------------------------------------------------
# NaN: ranks lowest, still a real candidate


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])
def test_nan_rows_rank_lowest(chunk_rows):
    z, queue = integer_inputs(8, 30, 6, seed=4)
    queue[[0, 3, 11, 12, 29]] = NAN
    queue[20, 2] = NAN  # a partly-NaN row: NaN against every query
    z[1] = NAN  # a NaN query: every score NaN, it gets the first row
    out, idx = torch_nn_lookup(z, queue, chunk_rows=chunk_rows)
    ref_out, ref_idx = reference_nn_lookup(z, queue)
    assert torch.equal(idx, ref_idx)
    assert idx[1] == 0
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0))
    for k in (5, 30):
        vals, top = torch_nn_topk(z, queue, k, chunk_rows=chunk_rows)
        ref_vals, ref_top = reference_nn_topk(z, queue, k)
        assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)
        # NaN rows are real candidates (so all 30 slots fill at k=30), but never twice.
        for row in top:
            assert row.unique().numel() == k
        assert (top >= 0).all()


def test_nan_only_queue():
    z, queue = inputs(4, 9, 5)
    queue[:] = NAN
    out, idx = torch_nn_lookup(z, queue, chunk_rows=2)
    assert torch.equal(idx, torch.zeros(4, dtype=torch.int64))
    vals, top = torch_nn_topk(z, queue, 4, chunk_rows=2)
    assert torch.equal(top, torch.arange(4).expand(4, 4))
    assert torch.equal(vals, torch.full((4, 4), -INF))


def test_nan_with_tensor_valid():
    z, queue = integer_inputs(4, 12, 5, seed=5)
    queue[1] = NAN
    queue[7] = NAN  # masked: never returned
    for valid in (2, 5):
        vals, top = torch_nn_topk(z, queue, 4, valid=torch.tensor(valid), chunk_rows=3)
        ref_vals, ref_top = reference_nn_topk(z, queue, 4, valid=valid)
        assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)
        _, idx = torch_nn_lookup(z, queue, valid=torch.tensor(valid), chunk_rows=3)
        assert torch.equal(idx, reference_nn_lookup(z, queue, valid=valid)[1])


def test_infinities():
    z, queue = integer_inputs(5, 20, 4, seed=6)
    queue[4, 0] = INF
    queue[9, 1] = -INF
    vals, top = torch_nn_topk(z, queue, 6, chunk_rows=3)
    ref_vals, ref_top = reference_nn_topk(z, queue, 6)
    assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)
    _, idx = torch_nn_lookup(z, queue, chunk_rows=3)
    assert torch.equal(idx, reference_nn_lookup(z, queue)[1])


# --------------------------------------------------------------------------------------------
# float64 (gradcheck) and argument checks


@pytest.mark.parametrize("chunk_rows", [1, 7, 100])
def test_float64(chunk_rows):
    z, queue = inputs(6, 50, 10)
    z, queue = z.double(), queue.double()
    out, idx = torch_nn_lookup(z, queue, chunk_rows=chunk_rows)
    ref_out, ref_idx = reference_nn_lookup(z, queue)
    assert out.dtype == torch.float64 and torch.equal(idx, ref_idx) and torch.equal(out, ref_out)
    vals, top = torch_nn_topk(z, queue, 5, chunk_rows=chunk_rows)
    ref_vals, ref_top = reference_nn_topk(z, queue, 5)
    assert vals.dtype == torch.float64 and torch.equal(top, ref_top)
    torch.testing.assert_close(vals, ref_vals, atol=1e-12, rtol=0)
    # A float32 queue against float64 queries is scored in float64 too.
    _, idx32 = torch_nn_lookup(z, queue.float(), chunk_rows=chunk_rows)
    assert torch.equal(idx32, reference_nn_lookup(z, queue.float())[1])


def test_gradcheck_float64_through_the_wrapper():
    z, queue = inputs(4, 30, 6)
    queue = queue.double()
    z = z.double().requires_grad_(True)
    # nn_topk's scores have an exact gradient (nn_lookup's is straight-through, not checkable).
    assert torch.autograd.gradcheck(lambda x: nn_topk(x, queue, k=3)[0], (z,))


def test_rejects_bad_chunk():
    z, queue = inputs(2, 5, 4)
    with pytest.raises(ValueError, match="chunk_rows"):
        torch_nn_lookup(z, queue, chunk_rows=0)
    with pytest.raises(ValueError, match="chunk_rows"):
        torch_nn_topk(z, queue, 1, chunk_rows=0)


def test_large_queue_many_chunks():
    # More rows than the default chunk: the buffer is reused, a short last chunk included.
    z, queue = inputs(37, 5000, 16)
    out, idx = torch_nn_lookup(z, queue, chunk_rows=1024)
    assert_lookup_close(z, queue, idx)
    _, top = torch_nn_topk(z, queue, 5, chunk_rows=1024)
    assert torch.equal(top[:, 0], idx)
    exact = exact_scores(z, queue)
    chosen = exact.gather(1, top)
    assert (chosen[:, :-1] >= chosen[:, 1:] - 1e-6).all()
    assert (chosen[:, -1] >= exact.topk(5, dim=1).values[:, -1] - 1e-5).all()


# --------------------------------------------------------------------------------------------
# Dispatch


def test_cpu_dispatch_without_interpreter(monkeypatch):
    # Outside the interpreter CPU tensors must take the chunked path (there is no CPU Triton).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    called = []
    monkeypatch.setattr(nn_search_triton, "triton_nn_lookup", lambda *a: called.append(a))
    monkeypatch.setattr(nn_search_triton, "triton_nn_topk", lambda *a: called.append(a))
    z, queue = integer_inputs(7, 300, 16)
    out, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    assert not called
    ref_out, ref_idx = reference_nn_lookup(z, queue, precision="ieee")
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)
    z.requires_grad_()
    nn_lookup(z, queue).sum().backward()
    assert z.grad is not None
    vals, top = nn_topk(z.detach(), queue, k=4)
    ref_vals, ref_top = reference_nn_topk(z.detach(), queue, 4, precision="default")
    assert not called
    assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)
    _, idx = nn_lookup(z.detach(), queue, valid=torch.tensor(0), return_indices=True)
    assert torch.equal(idx, torch.full((7,), -1))


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_topk_without_host_reads_matches_reference(monkeypatch, chunk_rows):
    # On a GPU (nn_topk with k > 16) the path reads nothing on the host: every query takes every
    # chunk. The same branch, driven here on CPU tensors, must give the oracle's answer.
    monkeypatch.setattr(nn_search_torch, "_host_reads_free", lambda device: False)
    z, queue = integer_inputs(6, 90, 12)
    queue[[3, 40]] = NAN
    for k, valid in ((4, None), (30, None), (20, torch.tensor(10)), (5, torch.tensor(0))):
        vals, idx = torch_nn_topk(z, queue, k, valid=valid, chunk_rows=chunk_rows)
        ref_vals, ref_idx = reference_nn_topk(z, queue, k, valid=valid)
        assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
