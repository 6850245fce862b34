"""nn_lookup / nn_topk against the naive oracle (nnclr_fast.ops.reference).

On a machine without CUDA the CPU tensors here run the Triton kernel itself in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so these tests prove the kernel; the chunked CPU
path has its own module (test_nn_search_torch.py). `TestGPU` runs the compiled kernel on CUDA.

Exactness: random float data is compared by what is robust to summation order (the interpreter's
dot is NumPy's BLAS, whose order depends on the position in the tile; a GPU's differs again):
indices must agree wherever the oracle's best and second-best exact similarities are further
apart than the rounding, and the chosen row must be within rounding of the best everywhere.
Exact ties are tested only on exactly representable scores (one-hot queries or one-hot rows).
"""

import os

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


def exact_scores(z, queue, valid=None, normalize_queue=False):
    rows = queue[:valid].double()
    if normalize_queue:
        rows = F.normalize(rows, dim=1)
    return F.normalize(z.double(), dim=1) @ rows.T


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
    """out is queue[idx] cast to out's dtype. The Triton interpreter casts float32 to 16-bit by
    truncation instead of round-to-nearest, so there the cast may differ by one ulp."""
    expected = queue[idx].to(out.dtype)
    if os.environ.get("TRITON_INTERPRET") == "1" and out.device.type == "cpu" and out.dtype != queue.dtype:
        torch.testing.assert_close(out, expected, rtol=2 * torch.finfo(out.dtype).eps, atol=0)
    else:
        assert torch.equal(out, expected)


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
    # The oracle rounds the query to the queue's dtype exactly as the tensor-core path does.
    z, queue = make_inputs(11, 150, 24, torch.float32, q_dtype)
    _, idx = nn_lookup(z, queue, return_indices=True)
    _, ref_idx = reference_nn_lookup(z, queue, precision="default")
    ref_scores = F.normalize(z, dim=1).to(q_dtype).float() @ queue.float().T
    chosen = ref_scores.gather(1, idx.view(-1, 1)).squeeze(1)
    best = ref_scores.gather(1, ref_idx.view(-1, 1)).squeeze(1)
    # The interpreter rounds float32 -> 16-bit by truncation, not to nearest: one ulp apart.
    assert torch.allclose(chosen, best, atol=DEFAULT_TOL[q_dtype])


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
    z, queue = make_inputs(4, 20, 8, z_dtype=z_dtype)
    z.requires_grad_()
    nn_lookup(z, queue).float().pow(2).sum().backward()
    assert z.grad.dtype == z_dtype and torch.isfinite(z.grad).all()


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


def test_topk_gradient_ignores_unfilled_slots():
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(15, 6, dtype=torch.float64), dim=1)
    vals, idx = nn_topk(z, queue, k=4, valid=torch.tensor(2))
    assert (idx[:, 2:] == -1).all()
    vals[:, :2].sum().backward()
    (grad_filled,) = torch.autograd.grad(nn_topk(z, queue, k=2, valid=2)[0].sum(), z)
    torch.testing.assert_close(z.grad, grad_filled)


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
