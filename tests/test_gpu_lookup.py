"""The compiled Triton kernel on a real GPU (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from nnclr_fast import nn_lookup, nn_topk
from nnclr_fast.reference import reference_nn_lookup, reference_nn_topk

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-3, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


def inputs(B, K, D, q_dtype, z_dtype=torch.float32):
    z = torch.randn(B, D, device="cuda", dtype=z_dtype)
    queue = F.normalize(torch.randn(K, D, device="cuda"), dim=1).to(q_dtype)
    return z, queue


@pytest.mark.parametrize("B,K,D", [(1, 1, 8), (512, 98_304, 256), (256, 8_192, 128), (37, 10_001, 72), (64, 4_096, 2048)])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_vs_reference(B, K, D, q_dtype):
    z, queue = inputs(B, K, D, q_dtype)
    _, idx = nn_lookup(z, queue, precision="ieee", return_indices=True)
    _, ref_idx = reference_nn_lookup(z, queue, precision="ieee")
    # Exact float32 on both sides; different summation orders may still flip a near-tie.
    assert (idx == ref_idx).float().mean() > 0.999
    exact = F.normalize(z.double(), dim=1) @ queue.double().T
    best = exact.max(dim=1).values
    for precision, tol in (("ieee", 1e-5), ("default", TOL[q_dtype])):
        out, idx = nn_lookup(z, queue, precision=precision, return_indices=True)
        assert torch.equal(out, queue[idx].to(z.dtype))
        assert (exact.gather(1, idx[:, None]).squeeze(1) >= best - tol).all()
    vals, top = nn_topk(z, queue, k=min(5, K), precision="ieee")
    ref_vals, _ = reference_nn_topk(z, queue, k=min(5, K))
    torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=0)


def test_valid_tensor_and_graph_capture():
    z, queue = inputs(256, 32_768, 128, torch.bfloat16)
    count = torch.tensor(1000, device="cuda")
    static_z = z.clone()
    nn_lookup(static_z, queue, valid=count)  # autotune before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_idx = nn_lookup(static_z, queue, valid=count, return_indices=True)
    for valid in (1000, 5, 32_768):
        count.fill_(valid)
        static_z.copy_(torch.randn_like(static_z))
        graph.replay()
        torch.cuda.synchronize()
        assert (static_idx < valid).all()
        _, ref = nn_lookup(static_z, queue, valid=valid, return_indices=True)
        assert torch.equal(static_idx, ref)


def test_torch_compile_inductor():
    z, queue = inputs(128, 8_192, 256, torch.bfloat16, torch.bfloat16)
    z.requires_grad_()

    def step(z):
        return (nn_lookup(z, queue) * F.normalize(z, dim=1)).sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(z)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(loss, step(z), atol=1e-2, rtol=1e-2)


def test_straight_through_on_gpu():
    z, queue = inputs(64, 4096, 128, torch.float32)
    z.requires_grad_()
    w = torch.randn_like(z)
    (nn_lookup(z, queue) * w).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (F.normalize(z2, dim=1) * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_extra_memory_is_o_bd():
    z, queue = inputs(512, 98_304, 256, torch.bfloat16)
    nn_lookup(z, queue)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    nn_lookup(z, queue)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # A B x K float32 score matrix alone would be 192 MiB.
    assert extra < 16 * 2**20
