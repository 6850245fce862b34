"""The chunked plain-PyTorch path (what CPU tensors run outside the interpreter)."""

import pytest
import torch
import torch.nn.functional as F

import nnclr_fast.kernels.nn_search as nn_search
from nnclr_fast import nn_lookup, nn_topk
from nnclr_fast.reference import chunked_nn_lookup, chunked_nn_topk, reference_nn_lookup, reference_nn_topk


def inputs(B, K, D, q_dtype=torch.float32):
    return torch.randn(B, D), F.normalize(torch.randn(K, D), dim=1).to(q_dtype)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_chunked_lookup_matches_reference(chunk_rows, q_dtype):
    z, queue = inputs(13, 150, 20, q_dtype)
    for precision in ("ieee", "default"):
        out, idx = chunked_nn_lookup(z, queue, precision=precision, chunk_rows=chunk_rows)
        ref_out, ref_idx = reference_nn_lookup(z, queue, precision=precision)
        assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)


@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
@pytest.mark.parametrize("k", [1, 4, 30])
def test_chunked_topk_matches_reference(chunk_rows, k):
    # One-hot queries score exactly queue[:, j] whatever the matmul's summation order, and
    # small-integer queue entries make ties everywhere, spread over many chunks.
    z = F.one_hot(torch.randint(0, 12, (6,)), 12).float() * 3
    queue = torch.randint(-2, 3, (90, 12)).float()
    vals, idx = chunked_nn_topk(z, queue, k, chunk_rows=chunk_rows)
    ref_vals, ref_idx = reference_nn_topk(z, queue, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals)


def test_chunked_tensor_valid_masks_on_device():
    z, queue = inputs(5, 100, 8)
    for valid in (1, 33, 100):
        _, idx = chunked_nn_lookup(z, queue, valid=torch.tensor(valid), chunk_rows=16)
        assert torch.equal(idx, reference_nn_lookup(z, queue, valid=valid)[1])
        _, top = chunked_nn_topk(z, queue, 1, valid=torch.tensor(valid), chunk_rows=16)
        assert torch.equal(top[:, 0], idx)


def test_chunked_rejects_bad_chunk():
    z, queue = inputs(2, 5, 4)
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked_nn_lookup(z, queue, chunk_rows=0)


def test_cpu_dispatch_without_interpreter(monkeypatch):
    # Outside the interpreter CPU tensors must take the chunked path (there is no CPU Triton).
    monkeypatch.setattr(nn_search, "interpreting", lambda: False)
    called = []
    monkeypatch.setattr(nn_search, "triton_nn_lookup", lambda *a: called.append(a))
    z, queue = inputs(7, 300, 16)
    out, idx = nn_lookup(z, queue, return_indices=True, precision="ieee")
    assert not called
    assert torch.equal(idx, reference_nn_lookup(z, queue, precision="ieee")[1])
    z.requires_grad_()
    nn_lookup(z, queue).sum().backward()
    assert z.grad is not None
    assert torch.equal(nn_topk(z.detach(), queue, k=4)[1], reference_nn_topk(z.detach(), queue, 4, precision="default")[1])
