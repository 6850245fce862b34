"""nn_lookup / nn_topk against the naive oracle (nnclr_fast.ops.reference).

On a machine without CUDA the CPU tensors here run the Triton kernel itself in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so these tests prove the kernel; the chunked CPU
path has its own module (test_nn_search_torch.py). `TestGPU` runs the compiled kernel on CUDA.

Exactness: random float data is compared by what is robust to summation order (the interpreter's
dot is NumPy's BLAS, whose order depends on the position in the tile; a GPU's differs again):
indices must agree wherever the oracle's best and second-best exact similarities are further
apart than the rounding, and the chosen row must be within rounding of the best everywhere.
Exact ties are tested only on exactly representable scores (one-hot queries or one-hot rows) or
on identical rows (the kernel computes every column of a tile in the same order).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nnclr_fast import nn_lookup, nn_topk
from nnclr_fast.ops.reference import reference_nn_lookup, reference_nn_topk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Largest similarity error of the tensor-core paths: the query is rounded to bf16/fp16 (2^-8 /
# 2^-11 relative) or both operands to TF32 (2^-11); similarities are cosines in [-1, 1].
DEFAULT_TOL = {torch.float32: 2e-3, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}
# Float32 similarities of unit vectors computed in two summation orders differ by far less.
IEEE_TOL = 1e-5


def make_inputs(B, K, D, z_dtype=torch.float32, q_dtype=torch.float32, device="cpu"):
    z = (torch.randn(B, D) * 3).to(device=device, dtype=z_dtype)
    queue = F.normalize(torch.randn(K, D), dim=1).to(device=device, dtype=q_dtype)
    return z, queue


def unit64(x):
    """Rows of x normalised in float64 (no overflow for float32 data, which float64 squares)."""
    return F.normalize(x.double(), dim=1, eps=0.0).nan_to_num(0.0)


def exact_scores(z, queue, valid=None, normalize_queue=False):
    rows = queue[:valid].double()
    if normalize_queue:
        rows = unit64(rows)
    return unit64(z) @ rows.T


def assert_nearest(z, queue, idx, ref_idx=None, *, tol=IEEE_TOL, valid=None, normalize_queue=False):
    """idx picks a row within `tol` of the best; where the best is clear (the runner-up is more
    than `tol` behind), idx equals the oracle's ref_idx."""
    scores = exact_scores(z.cpu(), queue.cpu(), valid, normalize_queue)
    idx = idx.cpu()
    assert ((idx >= 0) & (idx < scores.shape[1])).all()
    chosen = scores.gather(1, idx[:, None]).squeeze(1)
    top2 = scores.topk(min(2, scores.shape[1]), dim=1).values
    assert (chosen >= top2[:, 0] - tol).all()
    if ref_idx is not None:
        clear = top2[:, 0] - top2[:, -1] > tol if top2.shape[1] == 2 else torch.ones_like(chosen, dtype=torch.bool)
        assert torch.equal(idx[clear], ref_idx.cpu()[clear])


def assert_topk_near(z, queue, vals, idx, k, *, tol=IEEE_TOL, valid=None, normalize_queue=False):
    """Distinct real rows, best first, whose exact similarities are the k best within `tol`, and
    returned values equal to those similarities within `tol`."""
    scores = exact_scores(z.cpu(), queue.cpu(), valid, normalize_queue)
    vals, idx = vals.cpu().double(), idx.cpu()
    assert vals.shape == idx.shape == (z.shape[0], k)
    for row in idx.tolist():
        assert len(set(row)) == k and min(row) >= 0
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(vals, chosen, atol=tol, rtol=0)
    best = scores.topk(k, dim=1).values
    torch.testing.assert_close(chosen, best, atol=tol, rtol=0)
    assert (vals[:, :-1] >= vals[:, 1:] - tol).all(), "best first"


def assert_gathered(out, queue, idx):
    """out is queue[idx] cast to out's dtype, rounded to nearest even (PyTorch's cast) on every
    backend, the interpreter included."""
    assert torch.equal(out, queue[idx].to(out.dtype))


@pytest.mark.parametrize(
    "B,K,D",
    [(1, 1, 8), (1, 5, 16), (7, 37, 72), (33, 300, 16), (5, 130, 300), (17, 64, 256), (3, 1000, 33)],
)
def test_lookup_matches_reference_ieee(B, K, D):
    z, queue = make_inputs(B, K, D)
    out, idx = nn_lookup(z, queue, precision="ieee", return_indices=True)
    _, ref_idx = reference_nn_lookup(z, queue, precision="ieee")
    assert idx.dtype == torch.int64 and idx.shape == (B,)
    assert out.dtype == z.dtype and out.shape == z.shape
    assert_nearest(z, queue, idx, ref_idx)
    assert_gathered(out, queue, idx)


@pytest.mark.parametrize("q_dtype", DTYPES)
@pytest.mark.parametrize("z_dtype", DTYPES)
def test_lookup_all_dtype_pairs(z_dtype, q_dtype):
    z, queue = make_inputs(9, 200, 40, z_dtype, q_dtype)
    out, idx = nn_lookup(z, queue, return_indices=True)
    assert out.dtype == z_dtype and out.shape == z.shape
    assert_gathered(out, queue, idx)
    assert_nearest(z, queue, idx, tol=DEFAULT_TOL[q_dtype])

    _, idx_ieee = nn_lookup(z, queue, precision="ieee", return_indices=True)
    assert_nearest(z, queue, idx_ieee, reference_nn_lookup(z, queue, precision="ieee")[1])


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_default_matches_its_reference(q_dtype):
    # The oracle rounds the normalised query to the queue's dtype (to nearest even) exactly as the
    # tensor-core path does: scores agree to float32 summation error (~1e-7). A kernel that
    # skipped or truncated the rounding would be ~1e-3 off, inside DEFAULT_TOL but not 1e-6.
    z, queue = make_inputs(11, 150, 24, torch.float32, q_dtype)
    vals, top = nn_topk(z, queue, k=3)
    ref_vals, ref_top = reference_nn_topk(z, queue, k=3, precision="default")
    torch.testing.assert_close(vals, ref_vals, atol=1e-6, rtol=0)
    gap = ref_vals[:, :-1] - ref_vals[:, 1:]
    assert torch.equal(top[:, 0][gap[:, 0] > 1e-5], ref_top[:, 0][gap[:, 0] > 1e-5])
    _, idx = nn_lookup(z, queue, return_indices=True)
    assert torch.equal(idx, top[:, 0])


@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float16])
def test_gathered_rows_round_to_nearest(z_dtype):
    # A float32 row returned in a 16-bit z's dtype: 0.546185 is 0.546875 in bfloat16 (nearest),
    # not 0.54297 (truncated, as the interpreter's own cast would give).
    row = torch.tensor([[0.546185, -0.33317, 0.7677, 1 + 2**-8 + 2**-12, 0.0, 1e-3, -2.5e-2, 0.01234]])
    z = row.to(z_dtype)
    out, idx = nn_lookup(z, row, return_indices=True, precision="ieee")
    assert idx.tolist() == [0]
    assert torch.equal(out, row.to(z_dtype))
    if z_dtype == torch.bfloat16:
        assert out[0, 0].item() == 0.546875


@pytest.mark.parametrize("k", [1, 2, 5, 16, 17])
def test_topk_matches_reference(k):
    z, queue = make_inputs(6, 250, 20)
    vals, idx = nn_topk(z, queue, k=k, precision="ieee")
    ref_vals, _ = reference_nn_topk(z, queue, k=k)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64
    assert_topk_near(z, queue, vals, idx, k)
    torch.testing.assert_close(vals, ref_vals, atol=IEEE_TOL, rtol=0)


def test_topk_default_precision_is_near_optimal():
    z, queue = make_inputs(5, 120, 48, q_dtype=torch.bfloat16)
    vals, idx = nn_topk(z, queue, k=4)
    assert_topk_near(z, queue, vals, idx, 4, tol=DEFAULT_TOL[torch.bfloat16])


def one_hot_rows(axes, D=16):
    return F.one_hot(torch.tensor(axes), D).float()


def test_ties_go_to_lowest_index():
    # Rows 2, 7 and 9 are the same axis as the query: all three score exactly 1 in any order.
    queue = one_hot_rows([0, 1, 3, 4, 5, 6, 8, 3, 9, 3])
    z = one_hot_rows([3, 3, 3]) * torch.tensor([[1.0], [2.0], [0.5]])
    _, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    assert idx.tolist() == [2, 2, 2]
    vals, top = nn_topk(z, queue, k=3, precision="ieee")
    assert top[0].tolist() == [2, 7, 9] and vals[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("precision", ["ieee", "default"])
def test_ties_across_splits_and_tiles(precision):
    # 600 copies of one one-hot row span many tiles and (under the interpreter) many queue
    # splits; every query scores exactly its own 4th coordinate against each of them.
    queue = one_hot_rows([4] * 600, D=12)
    z = torch.randn(4, 12)
    _, idx = nn_lookup(z, queue, return_indices=True, precision=precision)
    assert idx.tolist() == [0, 0, 0, 0]
    _, top = nn_topk(z, queue, k=5, precision=precision)
    assert top.tolist() == [[0, 1, 2, 3, 4]] * 4


@pytest.mark.parametrize("valid", [1, 17, 100, 199])
def test_valid_int_and_tensor(valid):
    z, queue = make_inputs(8, 200, 16)
    # Make the unsearched tail the best match for every query: it must still never be chosen.
    queue[valid:] = F.normalize(z.mean(0, keepdim=True), dim=1)
    ref_idx = reference_nn_lookup(z, queue, valid=valid, precision="ieee")[1]
    for v in (valid, torch.tensor(valid), torch.tensor(valid, dtype=torch.int32)):
        _, idx = nn_lookup(z, queue, valid=v, return_indices=True, precision="ieee")
        assert_nearest(z, queue, idx, ref_idx, valid=valid)
    k = min(3, valid)
    for v in (valid, torch.tensor(valid)):
        vals, idx = nn_topk(z, queue, k=k, valid=v, precision="ieee")
        assert_topk_near(z, queue, vals, idx, k, valid=valid)


@pytest.mark.parametrize("z_dtype", DTYPES)
def test_nothing_searchable_gives_minus_one_and_the_query(z_dtype):
    z, queue = make_inputs(4, 50, 8, z_dtype=z_dtype)
    for valid in (torch.tensor(0), torch.tensor(-7)):
        out, idx = nn_lookup(z, queue, valid=valid, return_indices=True)
        assert idx.tolist() == [-1] * 4
        torch.testing.assert_close(out, F.normalize(z.float(), dim=1).to(z_dtype), rtol=0, atol=torch.finfo(z_dtype).eps)
        vals, top = nn_topk(z, queue, k=3, valid=valid)
        assert top.tolist() == [[-1] * 3] * 4 and torch.isneginf(vals).all()
    ref_out, ref_idx = reference_nn_lookup(z, queue, valid=0)
    assert ref_idx.tolist() == [-1] * 4
    torch.testing.assert_close(out, ref_out, rtol=0, atol=torch.finfo(z_dtype).eps)


def test_unfillable_topk_slots_are_minus_one():
    z, queue = make_inputs(5, 40, 8)
    count = torch.tensor(3)
    vals, idx = nn_topk(z, queue, k=5, valid=count, precision="ieee")
    assert (idx[:, 3:] == -1).all() and torch.isneginf(vals[:, 3:]).all()
    assert_topk_near(z, queue, vals[:, :3], idx[:, :3], 3, valid=3)
    ref_vals, ref_idx = reference_nn_topk(z, queue, k=5, valid=3)
    assert (ref_idx[:, 3:] == -1).all() and torch.isneginf(ref_vals[:, 3:]).all()


def test_valid_tensor_is_clamped_on_device():
    z, queue = make_inputs(4, 50, 8)
    _, idx_big = nn_lookup(z, queue, valid=torch.tensor(10**6), return_indices=True, precision="ieee")
    assert_nearest(z, queue, idx_big, reference_nn_lookup(z, queue, precision="ieee")[1])


@pytest.mark.parametrize("valid", [50, 51, 60, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**62])
def test_valid_past_k_never_reads_past_the_queue(valid):
    # The queue is the first 50 rows of a bigger tensor whose row 50 would win every query (all
    # real rows score below 0): a `valid` clamped to K never returns it, and one clamped in 64
    # bits searches every real row (2^31 would wrap to a negative count, 2^32 + 1 to one row).
    g = torch.Generator().manual_seed(5)
    storage = torch.randn(64, 8, generator=g)
    storage[:, 0] = storage[:, 0].abs() + 2
    storage[50:] = -F.one_hot(torch.tensor(0), 8).float()
    storage = F.normalize(storage, dim=1)
    z = -F.one_hot(torch.zeros(6, dtype=torch.int64), 8).float() + 0.1 * torch.randn(6, 8, generator=g)
    queue = storage[:50]
    assert (F.normalize(z, dim=1) @ queue.T).max() < 0 < (F.normalize(z, dim=1) @ storage[50:].T).min()
    ref_vals, ref_top = reference_nn_topk(z, queue, 3)
    for v in (torch.tensor(valid), torch.tensor(min(valid, 2**63 - 1), dtype=torch.int64)):
        _, idx = nn_lookup(z, queue, valid=v, return_indices=True, precision="ieee")
        assert torch.equal(idx, ref_top[:, 0])
        vals, top = nn_topk(z, queue, 3, valid=v, precision="ieee")
        assert torch.equal(top, ref_top)
        torch.testing.assert_close(vals, ref_vals, atol=IEEE_TOL, rtol=0)


def test_non_contiguous_inputs():
    z_t, queue_big = make_inputs(40, 300, 24)
    z = z_t.T.contiguous().T[::2]  # column-major, every other row
    queue = queue_big[::3]  # strided rows
    queue_cm = queue.T.contiguous().T  # column-major queue
    assert not z.is_contiguous() and not queue.is_contiguous() and not queue_cm.is_contiguous()
    _, ref_idx = reference_nn_lookup(z, queue, precision="ieee")
    for q in (queue, queue_cm):
        out, idx = nn_lookup(z, q, return_indices=True, precision="ieee")
        assert_nearest(z, queue, idx, ref_idx)
        assert_gathered(out, queue, idx)
        vals, top = nn_topk(z, q, k=3, precision="ieee")
        assert_topk_near(z, queue, vals, top, 3)


def test_zero_query_rows_behave_like_reference():
    # An all-zero query scores exactly 0 against every row: a tie everywhere, won by row 0.
    z, queue = make_inputs(4, 30, 8)
    z[1] = 0
    out, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    assert idx[1].item() == 0 == reference_nn_lookup(z, queue, precision="ieee")[1][1].item()
    assert torch.equal(out[1], queue[0])


def test_a_queue_whose_only_searchable_row_is_nan_returns_it():
    # NaN scores rank as -inf but the row stays a candidate: with nothing scoring above -inf the
    # lowest searchable row is returned, NaN and all.
    z, queue = make_inputs(3, 20, 8)
    queue[0] = float("nan")
    for precision in ("ieee", "default"):
        out, idx = nn_lookup(z, queue, valid=torch.tensor(1), return_indices=True, precision=precision)
        assert idx.tolist() == [0, 0, 0] and out.isnan().all()
        vals, top = nn_topk(z, queue, 2, valid=torch.tensor(1), precision=precision)
        assert top.tolist() == [[0, -1]] * 3 and torch.isneginf(vals).all()
        _, idx = nn_lookup(z, queue, valid=torch.tensor(20), return_indices=True, precision=precision)
        assert (idx > 0).all()
    assert torch.equal(reference_nn_lookup(z, queue, valid=1)[1], torch.zeros(3, dtype=torch.int64))


def test_nan_semantics():
    z, queue = make_inputs(3, 40, 8)
    z[0, 3] = float("nan")
    queue[5] = float("nan")
    # Make the NaN row the would-be best for query 2: it must still not win.
    z[2] = 0
    z[2, 0] = 1
    queue[5, 0] = float("nan")
    _, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    assert idx[0].item() == 0 == reference_nn_lookup(z, queue, precision="ieee")[1][0].item(), (
        "a query with no finite similarity gets the lowest searchable row"
    )
    assert 5 not in idx.tolist()
    clean = torch.ones(40, dtype=torch.bool)
    clean[5] = False
    assert_nearest(z[1:], queue[clean], torch.where(idx[1:] > 5, idx[1:] - 1, idx[1:]))
    # Top-k of the NaN query: every row scores "-inf", so the lowest indices, each once.
    vals, top = nn_topk(z, queue, k=4, precision="ieee")
    assert top[0].tolist() == [0, 1, 2, 3] and torch.isneginf(vals[0]).all()
    # The NaN row ranks below every real row, but is still a row: last of a full top-k.
    vals, top = nn_topk(z[1:2], queue[:8], k=8, precision="ieee")
    assert top[0, -1].item() == 5 and torch.isneginf(vals[0, -1]) and sorted(top[0].tolist()) == list(range(8))
    with pytest.raises(ValueError, match="z contains NaN"):
        nn_lookup(z, queue, check_finite=True)
    with pytest.raises(ValueError, match="queue contains NaN"):
        nn_lookup(z[1:], queue, check_finite=True)
    nn_lookup(z[1:], queue[clean], check_finite=True)


# ------------------------------------------------------------------------------------------
# Raw (un-normalised) banks: normalize_queue=True


def raw_bank(K, D, q_dtype=torch.float32):
    # Row lengths spread over four orders of magnitude, as raw projections can be.
    g = torch.Generator().manual_seed(7)
    scale = torch.exp(torch.empty(K, 1).uniform_(-4.6, 4.6, generator=g))
    return (torch.randn(K, D, generator=g) * scale).to(q_dtype)


def test_raw_bank_default_is_inner_product_not_cosine():
    # Why the option exists: on raw rows the default ranks by length as well as angle.
    z = torch.randn(64, 16)
    bank = raw_bank(300, 16)
    _, idx_ip = nn_lookup(z, bank, precision="ieee", return_indices=True)
    _, idx_cos = nn_lookup(z, bank, precision="ieee", normalize_queue=True, return_indices=True)
    assert (idx_ip != idx_cos).float().mean() > 0.5


@pytest.mark.parametrize("q_dtype", DTYPES)
@pytest.mark.parametrize("z_dtype", [torch.float32, torch.bfloat16])
def test_raw_bank_cosine(z_dtype, q_dtype):
    z = torch.randn(9, 24).to(z_dtype)
    bank = raw_bank(170, 24, q_dtype)
    out, idx = nn_lookup(z, bank, normalize_queue=True, precision="ieee", return_indices=True)
    _, ref_idx = reference_nn_lookup(z, bank, precision="ieee", normalize_queue=True)
    assert_nearest(z, bank, idx, ref_idx, normalize_queue=True)
    assert_gathered(out, bank, idx)  # the stored, raw row
    _, idx = nn_lookup(z, bank, normalize_queue=True, return_indices=True)
    assert_nearest(z, bank, idx, tol=DEFAULT_TOL[q_dtype], normalize_queue=True)
    vals, top = nn_topk(z, bank, k=4, normalize_queue=True, precision="ieee")
    assert_topk_near(z, bank, vals, top, 4, normalize_queue=True)


def test_raw_bank_with_zero_row_and_valid():
    z = torch.randn(6, 10)
    bank = raw_bank(60, 10)
    bank[3] = 0  # scores 0 (F.normalize keeps a zero row zero), never NaN
    count = torch.tensor(20)
    _, idx = nn_lookup(z, bank, valid=count, normalize_queue=True, precision="ieee", return_indices=True)
    assert_nearest(z, bank, idx, reference_nn_lookup(z, bank, valid=20, normalize_queue=True)[1], valid=20, normalize_queue=True)
    vals, top = nn_topk(z, bank, k=20, valid=count, normalize_queue=True, precision="ieee")
    zero_slot = (top == 3).nonzero()
    assert zero_slot.shape[0] == 6 and (vals[zero_slot[:, 0], zero_slot[:, 1]] == 0).all()


@pytest.mark.parametrize("q_dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_raw_bank_of_any_scale_gives_the_cosine_neighbour(q_dtype, scale):
    # Squaring rows of norm 1e30 overflows float32 and 1e-30 underflows it: the norms are taken
    # scaled by a power of two, so every finite row scores its cosine. float16 holds neither
    # scale, so it is tested at the widest it can hold.
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(60, 40, generator=g)
    z = bank[[7, 20, 33]] + 0.01 * torch.randn(3, 40, generator=g)
    if q_dtype == torch.float16:
        scale = 1e-3 if scale < 1 else 1e3
    # The queries' cosine neighbours scaled among unit-scale rows, and every row scaled.
    mixed = bank.clone()
    mixed[[7, 20, 33]] *= scale
    mixed, scaled = mixed.to(q_dtype), (bank * scale).to(q_dtype)
    for zs, b in ((z, mixed), (z * scale, mixed), (z, scaled)):
        for precision in ("ieee", "default"):
            _, idx = nn_lookup(zs, b, normalize_queue=True, return_indices=True, precision=precision)
            assert idx.tolist() == [7, 20, 33]
            vals, top = nn_topk(zs, b, 3, normalize_queue=True, precision=precision)
            ref_vals, ref_top = reference_nn_topk(zs, b, 3, normalize_queue=True, precision=precision)
            assert top[:, 0].tolist() == [7, 20, 33]
            torch.testing.assert_close(vals, ref_vals, atol=1e-6, rtol=0)


def test_query_of_any_scale_and_zero_rows():
    queue = F.normalize(torch.randn(70, 16), dim=1)
    z = torch.randn(6, 16)
    ref_vals, ref_top = reference_nn_topk(z, queue, 4)
    for scale in (1e-38, 1e-30, 1e30, 3e38 / 16):
        vals, top = nn_topk(z * scale, queue, 4, precision="ieee")
        assert torch.equal(top, ref_top)
        torch.testing.assert_close(vals, ref_vals, atol=IEEE_TOL, rtol=0)
    # An all-zero row stays zero: it scores exactly 0 everywhere (ties to row 0), and is its own
    # "neighbour" (zero) when nothing is searchable.
    z[2] = 0
    vals, top = nn_topk(z, queue, 3, precision="ieee")
    assert top[2].tolist() == [0, 1, 2] and (vals[2] == 0).all()
    out, idx = nn_lookup(z, queue, valid=torch.tensor(0), return_indices=True)
    assert idx.tolist() == [-1] * 6 and (out[2] == 0).all() and not out.isnan().any()


def test_identical_rows_tie_exactly():
    # Rows 3, 5, 6, 9 are one vector: every query near it must get row 3, and their top-4 in
    # index order, in any tile and split.
    g = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(300, 64, generator=g), dim=1)
    queue[[3, 5, 6, 9]] = F.normalize(torch.randn(1, 64, generator=g), dim=1)
    z = queue[3] + 0.05 * torch.randn(200, 64, generator=g)
    for q_dtype in (torch.float32, torch.bfloat16):
        for precision in ("ieee", "default"):
            _, idx = nn_lookup(z, queue.to(q_dtype), return_indices=True, precision=precision)
            assert (idx == 3).all(), f"{int((idx != 3).sum())} of {len(idx)} broke the lowest-index rule"
    _, top = nn_topk(z[:40], queue, 4)
    assert torch.equal(top, torch.tensor([[3, 5, 6, 9]]).expand(40, 4))


def test_gradcheck_float64_topk_scores_raw_bank():
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    bank = raw_bank(15, 6).double()
    assert torch.autograd.gradcheck(lambda x: nn_topk(x, bank, k=3, normalize_queue=True)[0], (z,))


# ------------------------------------------------------------------------------------------
# Gradients


def test_straight_through_gradient_matches_formula():
    z, queue = make_inputs(6, 50, 16)
    w = torch.randn(6, 16)
    z1 = z.clone().requires_grad_()
    queue.requires_grad_()
    out, idx = nn_lookup(z1, queue, return_indices=True)
    (out * w).sum().backward()
    assert queue.grad is None, "the queue never receives a gradient"

    z2 = z.clone().requires_grad_()
    zn = F.normalize(z2, dim=1)
    (zn + (queue.detach()[idx] - zn).detach()).mul(w).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)


@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float16])
def test_straight_through_gradient_low_precision_z(z_dtype):
    # The gradient of the normalisation at the 16-bit z, computed in float32 and rounded once.
    z, queue = make_inputs(4, 20, 8, z_dtype=z_dtype)
    w = torch.randn(4, 8)
    z.requires_grad_()
    (nn_lookup(z, queue).float() * w).sum().backward()
    z64 = z.detach().double().requires_grad_()
    (unit64(z64) * w.double()).sum().backward()
    assert z.grad.dtype == z_dtype
    # One rounding to z's dtype, plus float32 cancellation in (I - y y^T) g on small entries.
    eps = torch.finfo(z_dtype).eps
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=eps * float(z64.grad.abs().max()), rtol=eps)


def test_straight_through_gradient_of_tiny_huge_and_zero_rows():
    # (I - y y^T) / ||z|| without overflow: 1e-30 rows get gradients near 1e30, 1e30 rows near
    # 1e-30; an all-zero row (no derivative) gets zero.
    z = torch.randn(4, 6, dtype=torch.float64)
    z[0] *= 1e-30
    z[1] *= 1e30
    z[3] = 0
    w = torch.randn(4, 6, dtype=torch.float64)
    queue = F.normalize(torch.randn(9, 6, dtype=torch.float64), dim=1)
    for dtype in (torch.float32, torch.float64):
        zc = z.to(dtype, copy=True).requires_grad_()
        (nn_lookup(zc, queue.to(dtype)) * w.to(dtype)).sum().backward()
        z64 = z[:3].clone().requires_grad_()
        (z64 / z64.norm(dim=1, keepdim=True) * w[:3]).sum().backward()
        # Compared at unit scale (times ||z||): float32 cancellation leaves ~1e-7 absolute there.
        norm = z[:3].norm(dim=1, keepdim=True)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(zc.grad[:3].double() * norm, z64.grad * norm, rtol=0, atol=tol)
        assert (zc.grad[3] == 0).all()


def test_stop_gradient_gives_no_gradient_to_z():
    z, queue = make_inputs(4, 20, 8)
    z.requires_grad_()
    out = nn_lookup(z, queue, straight_through=False)
    assert not out.requires_grad
    other = torch.randn(4, 8, requires_grad=True)
    (out * other).sum().backward()
    assert z.grad is None
    assert other.grad is not None


def test_gradcheck_float64_topk_scores():
    # Similarities are smooth in z (for fixed winners), so their gradient is checkable in float64.
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(15, 6, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda x: nn_topk(x, queue, k=3)[0], (z,))


@pytest.mark.parametrize("normalize_queue", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_gradient_matches_autograd_through_the_oracle(dtype, normalize_queue):
    # The custom backward against autograd through the naive oracle's own arithmetic, with
    # unfilled slots (valid below k) and a weight per slot.
    z = (torch.randn(3, 6, dtype=torch.float64) * 4).to(dtype)
    queue = (torch.randn(15, 6, dtype=torch.float64) * (3 if normalize_queue else 1)).to(dtype)
    if not normalize_queue:
        queue = F.normalize(queue, dim=1)
    w = torch.randn(3, 4, dtype=dtype)
    for valid in (None, torch.tensor(2)):
        zo = z.clone().requires_grad_()
        vals, idx = nn_topk(zo, queue, k=4, valid=valid, normalize_queue=normalize_queue, precision="ieee")
        filled = idx >= 0
        (vals.where(filled, 0) * w).sum().backward()
        zr = z.clone().requires_grad_()
        ref_vals, ref_idx = reference_nn_topk(zr, queue, 4, valid=valid, normalize_queue=normalize_queue)
        assert torch.equal(idx, ref_idx)
        (ref_vals.where(filled, 0) * w).sum().backward()
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(zo.grad, zr.grad, rtol=tol, atol=tol)


def test_gradcheck_float64_straight_through():
    # The straight-through gradient is the gradient of F.normalize: check it in float64.
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1)
    g = torch.randn(4, 5, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad((nn_lookup(z, queue) * g).sum(), z)
    (grad_normalize,) = torch.autograd.grad((F.normalize(z, dim=1) * g).sum(), z)
    torch.testing.assert_close(grad_ours, grad_normalize)
    assert torch.autograd.gradcheck(lambda x: F.normalize(x, dim=1), (z,))


# ------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(z=torch.randn(4)), ValueError, "z must be 2-D"),
        (dict(queue=torch.randn(2, 3, 8)), ValueError, "queue must be 2-D"),
        (dict(z=torch.randn(4, 7)), ValueError, "same feature dim"),
        (dict(z=torch.randn(0, 8)), ValueError, "z is empty"),
        (dict(queue=torch.randn(0, 8)), ValueError, "queue is empty"),
        (dict(z=torch.ones(4, 8, dtype=torch.int64)), TypeError, "z must be float32"),
        (dict(queue=torch.ones(10, 8, dtype=torch.int32)), TypeError, "queue must be float32"),
        (dict(z=torch.randn(4, 8, dtype=torch.complex64)), TypeError, "z must be float32"),
        (dict(z=torch.randn(4, 8, device="meta")), ValueError, "same device"),
        (dict(valid=0), ValueError, r"valid must be in \[1, 10\]"),
        (dict(valid=11), ValueError, r"valid must be in \[1, 10\]"),
        (dict(valid=2.5), TypeError, "valid must be an int"),
        (dict(valid=True), TypeError, "valid must be an int"),
        (dict(valid=torch.tensor([3])), ValueError, "0-dim"),
        (dict(valid=torch.tensor(3.0)), TypeError, "valid must be an integer tensor"),
        (dict(valid=torch.tensor(3, device="meta")), ValueError, "valid must be on the queue's device"),
        (dict(precision="tf16"), ValueError, "precision must be one of"),
        (dict(z=[[1.0] * 8]), TypeError, "z must be a torch.Tensor"),
    ],
)
def test_bad_input_lookup(kwargs, exc, match):
    args = dict(z=torch.randn(4, 8), queue=F.normalize(torch.randn(10, 8), dim=1))
    args.update(kwargs)
    z, queue = args.pop("z"), args.pop("queue")
    with pytest.raises(exc, match=match):
        nn_lookup(z, queue, **args)
    with pytest.raises(exc, match=match):
        nn_topk(z, queue, k=1, **args)


@pytest.mark.parametrize(
    "k,valid,exc,match",
    [
        (0, None, ValueError, r"k must be in \[1, 10\]"),
        (11, None, ValueError, r"k must be in \[1, 10\]"),
        (4, 3, ValueError, r"k must be in \[1, 3\]"),
        (2.0, None, TypeError, "k must be an int"),
    ],
)
def test_bad_k(k, valid, exc, match):
    z, queue = make_inputs(4, 10, 8)
    with pytest.raises(exc, match=match):
        nn_topk(z, queue, k=k, valid=valid)


def test_interpreter_refuses_a_known_bad_version_pair_by_name(monkeypatch):
    from nnclr_fast.ops import nn_search_triton

    assert nn_search_triton.interpreter_incompatibility("3.6.0", "2.3.5") is None
    assert nn_search_triton.interpreter_incompatibility("3.7.0", "2.4.6") is None
    assert "numpy<2.4" in nn_search_triton.interpreter_incompatibility("3.6.0", "2.4.6")
    monkeypatch.setattr(nn_search_triton.triton, "__version__", "3.6.0")
    monkeypatch.setattr(nn_search_triton.numpy, "__version__", "2.4.0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z, queue = make_inputs(3, 10, 8)
    with pytest.raises(RuntimeError, match="Triton 3.6.0's interpreter"):
        nn_lookup(z, queue)


# ------------------------------------------------------------------------------------------
# Registration: custom ops, fake implementations, torch.compile


def test_opcheck_registrations():
    z, queue = make_inputs(5, 70, 12)
    z.requires_grad_()
    lookup, topk = torch.ops.nnclr_fast.nn_lookup.default, torch.ops.nnclr_fast.nn_topk.default
    torch.library.opcheck(lookup, (z, queue, None, False, False, True))
    torch.library.opcheck(lookup, (z, queue, torch.tensor(30), True, True, False))
    torch.library.opcheck(lookup, (z, queue, torch.tensor(0), True, False, True))
    torch.library.opcheck(topk, (z, queue, 3, torch.tensor(30), True, False))
    torch.library.opcheck(topk, (z, queue * 3, 3, torch.tensor(2), True, True))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    z, queue = make_inputs(6, 90, 16)
    count = torch.tensor(60)

    def step(z, queue, count):
        nn = nn_lookup(z, queue, valid=count)
        return (nn * F.normalize(z, dim=1)).sum(dim=1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, queue, count), step(z, queue, count))


# ------------------------------------------------------------------------------------------
# Property test: any shape


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 20),
    K=st.integers(1, 150),
    D=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    use_valid=st.booleans(),
)
def test_property_any_shape(B, K, D, seed, use_valid):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g)
    queue = F.normalize(torch.randn(K, D, generator=g), dim=1)
    valid = max(1, K // 2) if use_valid else None
    out, idx = nn_lookup(z, queue, valid=valid, precision="ieee", return_indices=True)
    _, ref_idx = reference_nn_lookup(z, queue, valid=valid, precision="ieee")
    assert_nearest(z, queue, idx, ref_idx, valid=valid)
    assert_gathered(out, queue, idx)
    k = min(3, valid or K)
    vals, top = nn_topk(z, queue, k=k, valid=valid, precision="ieee")
    assert_topk_near(z, queue, vals, top, k, valid=valid)


@pytest.mark.parametrize("q_dtype", DTYPES)
def test_heavy_ties_exact(q_dtype):
    # One-hot queries score exactly queue[:, j] in any precision and summation order, and
    # small-integer entries tie everywhere, across tiles and queue splits.
    z = F.one_hot(torch.randint(0, 10, (12,)), 10).float() * 2
    queue = torch.randint(-2, 3, (500, 10)).to(q_dtype)
    for precision in ("default", "ieee"):
        _, idx = nn_lookup(z, queue, precision=precision, return_indices=True)
        assert torch.equal(idx, reference_nn_lookup(z, queue, precision="ieee")[1])
        vals, top = nn_topk(z, queue, k=7, precision=precision)
        ref_vals, ref_top = reference_nn_topk(z, queue, k=7)
        assert torch.equal(top, ref_top) and torch.equal(vals, ref_vals)


# ------------------------------------------------------------------------------------------
# The compiled kernel on a GPU (skipped without CUDA)


@pytest.mark.gpu
class TestGPU:
    @staticmethod
    def inputs(B, K, D, q_dtype, z_dtype=torch.float32):
        z = torch.randn(B, D, device="cuda", dtype=z_dtype)
        queue = F.normalize(torch.randn(K, D, device="cuda"), dim=1).to(q_dtype)
        return z, queue

    @pytest.mark.parametrize("B,K,D", [(1, 1, 8), (512, 98_304, 256), (256, 8_192, 128), (37, 10_001, 72), (64, 4_096, 2048)])
    @pytest.mark.parametrize("q_dtype", DTYPES)
    def test_kernel_vs_reference(self, B, K, D, q_dtype):
        z, queue = self.inputs(B, K, D, q_dtype)
        for precision, tol in (("ieee", IEEE_TOL), ("default", DEFAULT_TOL[q_dtype])):
            out, idx = nn_lookup(z, queue, precision=precision, return_indices=True)
            assert torch.equal(out, queue[idx].to(z.dtype))
            assert_nearest(z, queue, idx, tol=tol)
        _, idx = nn_lookup(z, queue, precision="ieee", return_indices=True)
        assert_nearest(z, queue, idx, reference_nn_lookup(z, queue, precision="ieee")[1])
        k = min(5, K)
        vals, top = nn_topk(z, queue, k=k, precision="ieee")
        assert_topk_near(z, queue, vals, top, k)

    @pytest.mark.parametrize("q_dtype", DTYPES)
    def test_raw_bank_and_unfilled(self, q_dtype):
        z = torch.randn(300, 128, device="cuda")
        bank = raw_bank(20_000, 128, q_dtype).cuda()
        _, idx = nn_lookup(z, bank, normalize_queue=True, precision="ieee", return_indices=True)
        assert_nearest(z, bank, idx, normalize_queue=True)
        vals, top = nn_topk(z, bank, k=8, valid=torch.tensor(5, device="cuda"), normalize_queue=True)
        assert (top[:, 5:] == -1).all() and torch.isneginf(vals[:, 5:]).all()
        out, idx = nn_lookup(z, bank, valid=torch.tensor(0, device="cuda"), return_indices=True)
        assert (idx == -1).all()
        torch.testing.assert_close(out, F.normalize(z, dim=1))

    def test_valid_tensor_and_graph_capture(self):
        z, queue = self.inputs(256, 32_768, 128, torch.bfloat16)
        count = torch.tensor(1000, device="cuda")
        static_z = z.clone()
        nn_lookup(static_z, queue, valid=count)  # autotune before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_idx = nn_lookup(static_z, queue, valid=count, return_indices=True)
        for valid in (1000, 5, 32_768, 0):
            count.fill_(valid)
            static_z.copy_(torch.randn_like(static_z))
            graph.replay()
            torch.cuda.synchronize()
            assert (static_idx < max(valid, 1)).all()
            _, ref = nn_lookup(static_z, queue, valid=valid if valid else torch.tensor(0, device="cuda"), return_indices=True)
            assert torch.equal(static_idx, ref)

    def test_torch_compile_inductor(self):
        z, queue = self.inputs(128, 8_192, 256, torch.bfloat16, torch.bfloat16)
        z.requires_grad_()

        def step(z):
            return (nn_lookup(z, queue) * F.normalize(z, dim=1)).sum()

        compiled = torch.compile(step, fullgraph=True)
        loss = compiled(z)
        loss.backward()
        assert torch.isfinite(z.grad).all()
        torch.testing.assert_close(loss, step(z), atol=1e-2, rtol=1e-2)

    def test_straight_through(self):
        z, queue = self.inputs(64, 4096, 128, torch.float32)
        z.requires_grad_()
        w = torch.randn_like(z)
        (nn_lookup(z, queue) * w).sum().backward()
        z2 = z.detach().clone().requires_grad_()
        (F.normalize(z2, dim=1) * w).sum().backward()
        torch.testing.assert_close(z.grad, z2.grad)

    def test_extra_memory_is_o_bd(self):
        z, queue = self.inputs(512, 98_304, 256, torch.bfloat16)
        nn_lookup(z, queue)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        nn_lookup(z, queue)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        # A B x K float32 score matrix alone would be 192 MiB.
        assert extra < 16 * 2**20
