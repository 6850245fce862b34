"""The chunked plain-PyTorch path (what CPU tensors run outside the interpreter), against the oracle.

The path re-scores its shortlist in float64, so its choice is the oracle's exact one: indices are
compared with ``torch.equal`` even on random floats, and its scores agree with the oracle's
float64 scores up to their final rounding to float32.
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


@pytest.mark.parametrize("k", [1, 5])
def test_shortlist_across_groups_of_blocks(k):
    # Full blocks of BLOCK rows in several groups of GROUP blocks, the last group partly padding;
    # ties between rows of different groups, a NaN query (no floor) and NaN rows.
    rows = nn_search_torch.BLOCK * nn_search_torch.GROUP * 3 + 37
    z, queue = integer_inputs(9, rows, 8, seed=6)
    queue[[5, 300, rows - 1]] = NAN
    z[4] = NAN
    vals, idx = torch_nn_topk(z, queue, k)
    ref_vals, ref_idx = reference_nn_topk(z, queue, k)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    assert torch.equal(torch_nn_lookup(z, queue)[1], reference_nn_lookup(z, queue)[1])


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_subnormal_products_do_not_decide(q_dtype):
    # Row 100's products with the query are subnormal; oneDNN's bfloat16 GEMM flushes them (and
    # its partial sums) to zero, so its computed score is 0 while it is the exact best (1.5 times
    # row 0's), in another block than row 0. Exact in bfloat16 and float32. (Where the CPU has no
    # native bfloat16, the float32 GEMM does not flush and this passes either way.)
    dim = 256
    z = torch.ones(1, dim)
    queue = torch.zeros(200, dim)
    queue[0, 0] = 2.0**-118
    queue[100] = 1.5 * 2.0**-126
    queue = queue.to(q_dtype)
    for ieee in (False, True):
        assert torch_nn_lookup(z, queue, ieee=ieee)[1].tolist() == [100]
        assert torch_nn_topk(z, queue, 2, ieee=ieee)[1].tolist() == [[100, 0]]


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


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_default_precision_matches_the_rounding_oracle(q_dtype):
    # The oracle rounds the normalised query to the queue's dtype exactly as this path does; a
    # path that skipped or truncated that rounding would be off by ~1e-3 here, not 1e-7.
    z, queue = inputs(32, 400, 24, q_dtype)
    vals, top = torch_nn_topk(z, queue, 5, ieee=False, chunk_rows=64)
    ref_vals, ref_top = reference_nn_topk(z, queue, 5, precision="default")
    assert torch.equal(top, ref_top)
    torch.testing.assert_close(vals, ref_vals, atol=1e-7, rtol=0)
    _, idx = torch_nn_lookup(z, queue, ieee=False, chunk_rows=64)
    assert torch.equal(idx, reference_nn_lookup(z, queue, precision="default")[1])


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
        torch.testing.assert_close(out, reference_nn_lookup(z, queue, valid=0)[0], atol=0, rtol=2**-23)
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
    assert torch.equal(idx, torch.full((3,), -1))
    torch.testing.assert_close(out, reference_nn_lookup(z, queue, valid=0)[0], atol=0, rtol=2**-23)
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


# --------------------------------------------------------------------------------------------
# Ties: identical rows tie exactly, whatever the GEMM's column order


def tied_inputs(q_dtype, seed=0):
    """Rows 3, 5, 6 and 9 are one vector r; 1,800 queries near r make it the best row of every one."""
    g = torch.Generator().manual_seed(seed)
    queue = F.normalize(torch.randn(300, 64, generator=g), dim=1)
    queue[[3, 5, 6, 9]] = F.normalize(torch.randn(1, 64, generator=g), dim=1)
    z = queue[3] + 0.05 * torch.randn(1800, 64, generator=g)
    return z, queue.to(q_dtype)


@pytest.mark.parametrize("chunk_rows", [None, 7, 64])
@pytest.mark.parametrize("q_dtype,ieee", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_identical_rows_tie_exactly(chunk_rows, q_dtype, ieee):
    # A GEMM computes the columns at a tile's edge in another order, so identical rows can score
    # differently; the float64 re-scoring of the shortlist makes them tie (the lowest index wins).
    z, queue = tied_inputs(q_dtype)
    _, idx = torch_nn_lookup(z, queue, ieee=ieee, chunk_rows=chunk_rows)
    wrong = int((idx != 3).sum())
    assert wrong == 0, f"{wrong} of {len(idx)} lookups broke the lowest-index rule"
    vals, top = torch_nn_topk(z[:300], queue, 4, ieee=ieee, chunk_rows=chunk_rows)
    assert torch.equal(top, torch.tensor([[3, 5, 6, 9]]).expand(300, 4))
    assert (vals == vals[:, :1]).all()
    precision = "ieee" if ieee else "default"
    ref_vals, ref_top = reference_nn_topk(z[:300], queue, 4, precision=precision)
    assert torch.equal(top, ref_top)
    torch.testing.assert_close(vals, ref_vals, atol=1e-7, rtol=0)


def test_rescored_random_floats_match_the_oracle_exactly():
    # Random floats over many chunks and both GEMMs: the choice is the oracle's exact one.
    z, queue = inputs(40, 3000, 48, torch.bfloat16)
    for ieee in (True, False):
        precision = "ieee" if ieee else "default"
        _, idx = torch_nn_lookup(z, queue, ieee=ieee, chunk_rows=256)
        assert torch.equal(idx, reference_nn_lookup(z, queue, precision=precision)[1])
        vals, top = torch_nn_topk(z, queue, 7, ieee=ieee, chunk_rows=256)
        ref_vals, ref_top = reference_nn_topk(z, queue, 7, precision=precision)
        assert torch.equal(top, ref_top)
        torch.testing.assert_close(vals, ref_vals, atol=1e-7, rtol=0)


def test_shortlist_bound_covers_a_bfloat16_gemm():
    # The bf16 GEMM rounds each score to bfloat16 (8 bits): rows whose exact scores differ by
    # less than that round to the same value, and the bound must keep all of them in the
    # shortlist. Rows that agree to ~1e-4 with the query, spread over the whole queue.
    g = torch.Generator().manual_seed(3)
    base = F.normalize(torch.randn(1, 32, generator=g), dim=1)
    queue = F.normalize(base + 2e-3 * torch.randn(2000, 32, generator=g), dim=1).bfloat16()
    z = base + 1e-3 * torch.randn(16, 32, generator=g)
    _, idx = torch_nn_lookup(z, queue, ieee=False, chunk_rows=512)
    assert torch.equal(idx, reference_nn_lookup(z, queue, precision="default")[1])


# --------------------------------------------------------------------------------------------
# The normalisation contract: any finite scale, zero rows, non-finite rows


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_any_row_scale_gives_the_cosine_neighbour(q_dtype, scale):
    # Rows 7, 20 and 33 (the queries' cosine neighbours) scaled to norm ~scale among unit-scale
    # rows: squaring them in float32 overflows (1e20^2) or underflows (1e-30^2), and an eps would
    # shrink the tiny ones' scores.
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(60, 40, generator=g)
    z = bank[[7, 20, 33]] + 0.01 * torch.randn(3, 40, generator=g)
    bank[[7, 20, 33]] *= scale
    for z_scale in (1.0, scale):
        zs = z * z_scale
        for ieee in (True, False):
            precision = "ieee" if ieee else "default"
            b = bank.to(q_dtype)
            _, idx = torch_nn_lookup(zs, b, ieee=ieee, normalize_queue=True, chunk_rows=16)
            assert idx.tolist() == [7, 20, 33]
            assert torch.equal(idx, reference_nn_lookup(zs, b, precision=precision, normalize_queue=True)[1])
            vals, top = torch_nn_topk(zs, b, 3, ieee=ieee, normalize_queue=True, chunk_rows=16)
            ref_vals, ref_top = reference_nn_topk(zs, b, 3, precision=precision, normalize_queue=True)
            assert torch.equal(top, ref_top) and top[:, 0].tolist() == [7, 20, 33]
            torch.testing.assert_close(vals, ref_vals, atol=1e-6, rtol=0)


def test_zero_and_non_finite_rows_under_normalize_queue():
    z, queue = inputs(5, 30, 8)
    queue = queue * 1e25
    queue[4] = 0  # scores exactly 0
    queue[9, 2] = INF  # all NaN after normalisation: ranks as -inf
    queue[11, 0] = NAN
    vals, top = torch_nn_topk(z, queue, 30, normalize_queue=True, chunk_rows=8)
    ref_vals, ref_top = reference_nn_topk(z, queue, 30, normalize_queue=True)
    assert torch.equal(top, ref_top)
    torch.testing.assert_close(vals, ref_vals, atol=1e-7, rtol=0)
    zero_slot = top == 4
    assert (vals[zero_slot] == 0).all()
    assert torch.isneginf(vals[:, -2:]).all() and (top[:, -2:] == torch.tensor([9, 11])).all()


def test_a_nan_row_is_returned_only_when_nothing_scores_above_minus_inf():
    z, queue = inputs(4, 6, 5)
    queue[0] = NAN
    out, idx = torch_nn_lookup(z, queue, valid=torch.tensor(1))
    assert idx.tolist() == [0] * 4 and out.isnan().all()
    _, idx = torch_nn_lookup(z, queue, valid=torch.tensor(6))
    assert (idx > 0).all()


@pytest.mark.parametrize("host_reads", [True, False])
def test_valid_beyond_int32_searches_every_row(monkeypatch, host_reads):
    monkeypatch.setattr(nn_search_torch, "_host_reads_free", lambda device: host_reads)
    z, queue = integer_inputs(5, 40, 8, seed=7)
    ref_vals, ref_top = reference_nn_topk(z, queue, 3)
    for valid in (2**31, 2**32 + 1, 2**40):
        vals, top = torch_nn_topk(z, queue, 3, valid=torch.tensor(valid))
        assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)
        _, idx = torch_nn_lookup(z, queue, valid=torch.tensor(valid))
        assert torch.equal(idx, ref_top[:, 0])


# --------------------------------------------------------------------------------------------
# Without host reads (any device but the CPU): nothing read back, the same answers


def forbid_host_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("read device memory on the host")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_lookup_and_topk_without_host_reads(monkeypatch, chunk_rows):
    monkeypatch.setattr(nn_search_torch, "_host_reads_free", lambda device: False)
    z, queue = integer_inputs(6, 90, 12)
    queue[[3, 40]] = NAN
    cases = [(None, 1), (None, 4), (None, 30), (torch.tensor(10), 20), (torch.tensor(0), 5), (torch.tensor(2**32 + 1), 3)]
    expected = [(reference_nn_lookup(z, queue, valid=v), reference_nn_topk(z, queue, k, valid=v)) for v, k in cases]
    forbid_host_reads(monkeypatch)
    for (valid, k), ((ref_out, ref_idx), (ref_vals, ref_top)) in zip(cases, expected):
        out, idx = torch_nn_lookup(z, queue, valid=valid, chunk_rows=chunk_rows)
        vals, top = torch_nn_topk(z, queue, k, valid=valid, chunk_rows=chunk_rows)
        monkeypatch.undo()
        assert torch.equal(idx, ref_idx) and torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0))
        assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)
        monkeypatch.setattr(nn_search_torch, "_host_reads_free", lambda device: False)
        forbid_host_reads(monkeypatch)


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_queue_with_and_without_a_native_bfloat16_gemm(monkeypatch, native):
    # The bfloat16 GEMM (results rounded to bfloat16) and the float32 GEMM of upcast rows only
    # shortlist: both give the oracle's exact choice and scores.
    monkeypatch.setattr(nn_search_torch, "_native_bfloat16", lambda: native)
    z, queue = tied_inputs(torch.bfloat16)
    z = z[:200]
    _, idx = torch_nn_lookup(z, queue, ieee=False, chunk_rows=128)
    assert (idx == 3).all()
    z, queue = inputs(30, 1000, 40, torch.bfloat16)
    vals, top = torch_nn_topk(z, queue, 6, ieee=False, chunk_rows=128)
    ref_vals, ref_top = reference_nn_topk(z, queue, 6, precision="default")
    assert torch.equal(top, ref_top)
    torch.testing.assert_close(vals, ref_vals, atol=1e-7, rtol=0)
