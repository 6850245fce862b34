"""One NNCLR training step end to end, with the naive lookup and with nnclr_fast's.

The step is built here from torchvision's ResNet-18 (random init, no download) and small MLP
heads, so that it depends on nothing but the lookup under test: two 96x96 views of a 256-image
batch, a full 98,304-row float32 queue of 256-d projections, the symmetric NNCLR loss, SGD. The
network runs under bf16 autocast; both lookups run outside it at TF32, so the two steps differ
only in the lookup.

The lookup's share of the step is its own forward+backward time, measured in isolation at the
step's sizes (CUDA events around graph replays), times the two lookups a step makes, over the
step's median time (CUDA events around eager steps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnclr_fast
from nnclr_fast import benchmark as baselines

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the end-to-end training step (ResNet-18, 2 x 256 images at 96x96, 98,304-row queue) is a GPU benchmark",
)

BATCH, IMAGE, QUEUE_SIZE, DIM = 256, 96, 98_304, 256
TEMPERATURE = 0.1
LOOKUP_TIMING_ROUNDS = 20
SETUP = (
    f"ResNet-18 (torchvision, random init, channels_last) on 2 x {BATCH} images at {IMAGE}x{IMAGE} under "
    f"bf16 autocast, projector 512-2048-{DIM}, predictor {DIM}-4096-{DIM}, symmetric NNCLR loss "
    f"(temperature {TEMPERATURE}), SGD with momentum, float32 queue {QUEUE_SIZE} x {DIM} searched at TF32, "
    "plain index_copy_ enqueue"
)


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class NNCLRNet(nn.Module):
    def __init__(self):
        super().__init__()
        torchvision = pytest.importorskip("torchvision", reason="the training step's ResNet-18 comes from torchvision")
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.projector = mlp(512, 2048, DIM)
        self.predictor = mlp(DIM, 4096, DIM)


def contrastive(nn_z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    logits = F.normalize(nn_z, dim=1) @ F.normalize(p, dim=1).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


LOOKUPS = {
    "naive": lambda z, queue: baselines.naive_lookup(z, queue, "tf32")[0],
    "nnclr_fast": lambda z, queue: nnclr_fast.nn_lookup(z, queue),
}


def make_step(lookup, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    model = NNCLRNet().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-6)
    views = torch.randn(2 * BATCH, 3, IMAGE, IMAGE, generator=gen).to(device, memory_format=torch.channels_last)
    # Steady state: a full queue; the enqueue is the same plain one for both steps.
    queue = baselines.IndexCopyQueue(QUEUE_SIZE, DIM, torch.float32, device)
    queue.bank.copy_(F.normalize(torch.randn(QUEUE_SIZE, DIM, generator=gen), dim=1))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z = model.projector(model.backbone(views))
            p = model.predictor(z)
        z1, z2 = z.float().chunk(2)
        p1, p2 = p.float().chunk(2)
        nn1, nn2 = lookup(z1, queue.bank), lookup(z2, queue.bank)
        loss = 0.5 * (contrastive(nn1, p2) + contrastive(nn2, p1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        queue.enqueue(z1.detach())
        return loss.detach()

    return step


def lookup_ms(lookup, device) -> float:
    """Median forward+backward of one lookup at the step's sizes (nnclr_fast.benchmark.time_calls:
    CUDA events around graph replays, rotating queue copies)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    queue = F.normalize(torch.randn(QUEUE_SIZE, DIM, generator=gen), dim=1).to(device)
    z = torch.randn(BATCH, DIM, generator=gen).to(device).requires_grad_(True)
    grad = torch.randn(BATCH, DIM, generator=gen).to(device)

    def once(q):
        z.grad = None
        lookup(z, q).backward(grad)

    timing = baselines.time_calls(once, baselines.queue_copies(queue), device, rounds=LOOKUP_TIMING_ROUNDS)
    return timing.median_s * 1e3


@pytest.fixture
def cudnn_benchmark():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("method", tuple(LOOKUPS))
def test_train_step(benchmark, bench, method, cudnn_benchmark):
    lookup = LOOKUPS[method]
    with baselines.torch_matmul_precision("tf32"):
        step = make_step(lookup, bench.device)
        info = {"op": "train_step", "pass": "forward+backward+update", "method": method, "precision": "tf32"}
        info.update(is_default=True, B=BATCH, K=QUEUE_SIZE, D=DIM, dtype="float32", setup=SETUP)
        bench.measure(benchmark, lambda _: step(), info, graph=False)
        per_call = lookup_ms(lookup, bench.device)
    if benchmark.stats is None:
        # --benchmark-disable: the step ran once as a smoke test, nothing was timed.
        return
    step_ms = benchmark.extra_info["device_timing"]["median_s"] * 1e3
    benchmark.extra_info.update({"lookup_ms": per_call, "lookups_per_step": 2, "lookup_share": 2 * per_call / step_ms})
