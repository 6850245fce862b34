"""nn_lookup / nn_topk against the plain-PyTorch reference.

On a machine without CUDA the CPU tensors here run the Triton kernel itself in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so these tests prove the kernel; the chunked CPU
path is tested directly in test_chunked_path.py.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nnclr_fast import nn_lookup, nn_topk
from nnclr_fast.reference import reference_nn_lookup, reference_nn_topk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Largest similarity error of the tensor-core paths: the query is rounded to bf16/fp16 (2^-8 /
# 2^-11 relative) or both operands to TF32 (2^-11); similarities are cosines in [-1, 1].
DEFAULT_TOL = {torch.float32: 2e-3, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


def make_inputs(B, K, D, z_dtype=torch.float32, q_dtype=torch.float32, device="cpu"):
    z = (torch.randn(B, D) * 3).to(device=device, dtype=z_dtype)
    queue = F.normalize(torch.randn(K, D), dim=1).to(device=device, dtype=q_dtype)
    return z, queue


def assert_gathered(out, queue, idx):
    """out is queue[idx] cast to out's dtype. The Triton interpreter casts float32 to 16-bit by
    truncation instead of round-to-nearest, so there the cast may differ by one ulp."""
    expected = queue[idx].to(out.dtype)
    if os.environ.get("TRITON_INTERPRET") == "1" and out.device.type == "cpu" and out.dtype != queue.dtype:
        torch.testing.assert_close(out, expected, rtol=2 * torch.finfo(out.dtype).eps, atol=0)
    else:
        assert torch.equal(out, expected)


def true_scores(z, queue):
    return F.normalize(z.double(), dim=1) @ queue.double().T


def assert_is_nearest(z, queue, idx, tol, valid=None):
    """The chosen row's exact similarity is the true maximum within `tol`."""
    valid = queue.shape[0] if valid is None else valid
    scores = true_scores(z, queue[:valid])
    assert (idx >= 0).all() and (idx < valid).all()
    chosen = scores.gather(1, idx.view(-1, 1)).squeeze(1)
    assert (chosen >= scores.max(dim=1).values - tol).all()


@pytest.mark.parametrize(
    "B,K,D",
    [(1, 1, 8), (1, 5, 16), (7, 37, 72), (33, 300, 16), (5, 130, 300), (17, 64, 256), (3, 1000, 33)],
)
def test_lookup_matches_reference_ieee(B, K, D):
    z, queue = make_inputs(B, K, D)
    out, idx = nn_lookup(z, queue, precision="ieee", return_indices=True)
    ref_out, ref_idx = reference_nn_lookup(z, queue, precision="ieee")
    assert idx.dtype == torch.int64 and idx.shape == (B,)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(out, ref_out)


@pytest.mark.parametrize("q_dtype", DTYPES)
@pytest.mark.parametrize("z_dtype", DTYPES)
def test_lookup_all_dtype_pairs(z_dtype, q_dtype):
    z, queue = make_inputs(9, 200, 40, z_dtype, q_dtype)
    out, idx = nn_lookup(z, queue, return_indices=True)
    assert out.dtype == z_dtype and out.shape == z.shape
    assert_gathered(out, queue, idx)
    assert_is_nearest(z, queue, idx, DEFAULT_TOL[q_dtype])

    out_ieee, idx_ieee = nn_lookup(z, queue, precision="ieee", return_indices=True)
    assert torch.equal(idx_ieee, reference_nn_lookup(z, queue, precision="ieee")[1])


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_default_matches_its_reference(q_dtype):
    # The reference rounds the query to the queue's dtype exactly as the tensor-core path does.
    z, queue = make_inputs(11, 150, 24, torch.float32, q_dtype)
    _, idx = nn_lookup(z, queue, return_indices=True)
    _, ref_idx = reference_nn_lookup(z, queue, precision="default")
    ref_scores = (F.normalize(z, dim=1).to(q_dtype).float() @ queue.float().T)
    chosen = ref_scores.gather(1, idx.view(-1, 1)).squeeze(1)
    best = ref_scores.gather(1, ref_idx.view(-1, 1)).squeeze(1)
    # The interpreter rounds float32 -> 16-bit by truncation, not to nearest: one ulp apart.
    assert torch.allclose(chosen, best, atol=DEFAULT_TOL[q_dtype])


@pytest.mark.parametrize("k", [1, 2, 5, 16, 17])
def test_topk_matches_reference(k):
    z, queue = make_inputs(6, 250, 20)
    vals, idx = nn_topk(z, queue, k=k, precision="ieee")
    ref_vals, ref_idx = reference_nn_topk(z, queue, k=k)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64
    assert vals.shape == idx.shape == (6, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals, atol=1e-6, rtol=1e-6)
    assert (vals[:, :-1] >= vals[:, 1:]).all(), "best first"


def test_topk_default_precision_is_near_optimal():
    z, queue = make_inputs(5, 120, 48, q_dtype=torch.bfloat16)
    vals, idx = nn_topk(z, queue, k=4)
    exact = true_scores(z, queue)
    kth_best = exact.topk(4, dim=1).values
    chosen = exact.gather(1, idx)
    assert (chosen >= kth_best - DEFAULT_TOL[torch.bfloat16]).all()
    torch.testing.assert_close(vals.double(), chosen, atol=DEFAULT_TOL[torch.bfloat16], rtol=0)


def test_ties_go_to_lowest_index():
    D = 16
    base = F.normalize(torch.randn(10, D), dim=1)
    # Row 7 duplicates row 2, row 9 duplicates row 2 as well; query = row 2 exactly.
    queue = torch.cat([base[:7], base[2:3], base[8:9], base[2:3]])
    z = base[2:3].repeat(3, 1) * torch.tensor([[1.0], [2.0], [0.5]])
    _, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    assert idx.tolist() == [2, 2, 2]
    _, top = nn_topk(z, queue, k=3, precision="ieee")
    assert top[0].tolist() == [2, 7, 9]


def test_ties_across_splits_and_tiles():
    # 600 identical rows span many tiles and (under the interpreter) many queue splits.
    row = F.normalize(torch.randn(1, 12), dim=1)
    queue = row.repeat(600, 1)
    z = torch.randn(4, 12)
    _, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    assert idx.tolist() == [0, 0, 0, 0]
    _, top = nn_topk(z, queue, k=5, precision="ieee")
    assert top.tolist() == [[0, 1, 2, 3, 4]] * 4


@pytest.mark.parametrize("valid", [1, 17, 100, 199])
def test_valid_int_and_tensor(valid):
    z, queue = make_inputs(8, 200, 16)
    # Make the unsearched tail the best match for every query: it must still never be chosen.
    queue[valid:] = F.normalize(z.mean(0, keepdim=True), dim=1)
    ref_idx = reference_nn_lookup(z, queue, valid=valid, precision="ieee")[1]
    for v in (valid, torch.tensor(valid), torch.tensor(valid, dtype=torch.int32)):
        _, idx = nn_lookup(z, queue, valid=v, return_indices=True, precision="ieee")
        assert torch.equal(idx, ref_idx)
    k = min(3, valid)
    ref_top = reference_nn_topk(z, queue, k=k, valid=valid)[1]
    assert torch.equal(nn_topk(z, queue, k=k, valid=valid, precision="ieee")[1], ref_top)
    assert torch.equal(nn_topk(z, queue, k=k, valid=torch.tensor(valid), precision="ieee")[1], ref_top)


def test_valid_tensor_is_clamped_on_device():
    z, queue = make_inputs(4, 50, 8)
    _, idx0 = nn_lookup(z, queue, valid=torch.tensor(0), return_indices=True)
    assert idx0.tolist() == [0, 0, 0, 0]
    _, idx_big = nn_lookup(z, queue, valid=torch.tensor(10**6), return_indices=True, precision="ieee")
    assert torch.equal(idx_big, reference_nn_lookup(z, queue, precision="ieee")[1])


def test_non_contiguous_inputs():
    z_t, queue_big = make_inputs(40, 300, 24)
    z = z_t.T.contiguous().T[::2]  # column-major, every other row
    queue = queue_big[::3]  # strided rows
    queue_cm = queue.T.contiguous().T  # column-major queue
    assert not z.is_contiguous() and not queue.is_contiguous() and not queue_cm.is_contiguous()
    ref_out, ref_idx = reference_nn_lookup(z, queue, precision="ieee")
    for q in (queue, queue_cm):
        out, idx = nn_lookup(z, q, return_indices=True, precision="ieee")
        assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)
        assert torch.equal(nn_topk(z, q, k=3, precision="ieee")[1], reference_nn_topk(z, queue, k=3)[1])


def test_zero_query_rows_behave_like_reference():
    z, queue = make_inputs(4, 30, 8)
    z[1] = 0
    out, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    ref_out, ref_idx = reference_nn_lookup(z, queue, precision="ieee")
    assert idx[1].item() == 0 == ref_idx[1].item()
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)


def test_nan_semantics():
    z, queue = make_inputs(3, 40, 8)
    z[0, 3] = float("nan")
    queue[5] = float("nan")
    # Make the NaN row the would-be best for query 2: it must still not win.
    z[2] = 0
    z[2, 0] = 1
    out, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    ref_idx = reference_nn_lookup(z, queue, precision="ieee")[1]
    assert torch.equal(idx, ref_idx)
    assert idx[0].item() == 0, "a query with no finite similarity gets row 0"
    assert 5 not in idx.tolist()
    with pytest.raises(ValueError, match="z contains NaN"):
        nn_lookup(z, queue, check_finite=True)
    with pytest.raises(ValueError, match="queue contains NaN"):
        nn_lookup(z[1:], queue, check_finite=True)
    clean = torch.cat([queue[:5], queue[6:]])
    nn_lookup(z[1:], clean, check_finite=True)


def test_straight_through_gradient_matches_formula():
    z, queue = make_inputs(6, 50, 16)
    w = torch.randn(6, 16)
    z1 = z.clone().requires_grad_()
    queue.requires_grad_()
    (nn_lookup(z1, queue) * w).sum().backward()
    assert queue.grad is None, "the queue never receives a gradient"

    z2 = z.clone().requires_grad_()
    _, idx = reference_nn_lookup(z, queue.detach())
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
    from nnclr_fast.kernels import nn_search

    assert nn_search.interpreter_incompatibility("3.6.0", "2.3.5") is None
    assert nn_search.interpreter_incompatibility("3.7.0", "2.4.6") is None
    assert "numpy<2.4" in nn_search.interpreter_incompatibility("3.6.0", "2.4.6")
    monkeypatch.setattr(nn_search.triton, "__version__", "3.6.0")
    monkeypatch.setattr(nn_search.numpy, "__version__", "2.4.0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z, queue = make_inputs(3, 10, 8)
    with pytest.raises(RuntimeError, match="Triton 3.6.0's interpreter"):
        nn_lookup(z, queue)


# ------------------------------------------------------------------------------------------
# Registration: custom ops, fake implementations, torch.compile


def test_opcheck_registrations():
    z, queue = make_inputs(5, 70, 12)
    z.requires_grad_()
    torch.library.opcheck(torch.ops.nnclr_fast.nn_lookup.default, (z, queue, None, False, True))
    torch.library.opcheck(torch.ops.nnclr_fast.nn_lookup.default, (z, queue, torch.tensor(30), True, False))
    torch.library.opcheck(torch.ops.nnclr_fast.nn_topk.default, (z, queue, 3, torch.tensor(30), True))


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
# Property test: any shape, exact float32 indices


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
    ref_out, ref_idx = reference_nn_lookup(z, queue, valid=valid, precision="ieee")
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)
    k = min(3, valid or K)
    assert torch.equal(nn_topk(z, queue, k=k, valid=valid, precision="ieee")[1], reference_nn_topk(z, queue, k, valid)[1])


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
