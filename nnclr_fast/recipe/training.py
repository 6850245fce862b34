"""One NNCLR (or SimCLR) training step, the online probe, the schedule and an epoch loop.

Order inside a step (the reason this module exists rather than a free-form loop):

1. both views go through the model in one batch (one forward, so batch norm sees both views,
   as in SimCLR, and DDP sees a single forward per backward);
2. both projections are LOOKED UP in the support set;
3. only then are the view-1 projections ENQUEUED.

Looking up after enqueueing would put z1 itself in the support set, so NN(z1) = z1 and the
"nearest neighbour" positive degenerates into the view's own embedding (a SimCLR step in
disguise, and z2's neighbour would mostly be its own pair's z1). What goes in is what the
support set is searched with: projections z (not backbone features), L2-normalised, detached
(the queue is a memory, never a path for gradients), of one view per image. The paper updates
the support set with the current batch's embeddings at the end of each step; the Keras
example enqueues the first view's projections after its lookups, as lightly's NNCLR example
does with one view's projections; so does this step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnclr_fast.recipe.losses import contrastive_accuracy, nnclr_loss

METHODS = ("nnclr", "simclr")


@dataclass
class StepOutput:
    loss: torch.Tensor
    h1: torch.Tensor
    h2: torch.Tensor
    z1: torch.Tensor
    positives1: torch.Tensor
    positives2: torch.Tensor


def contrastive_step(
    model: nn.Module,
    queue,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    method: str = "nnclr",
    temperature: float = 0.1,
    loss_variant: str = "paper",
    straight_through: bool = False,
) -> StepOutput:
    """Forward both views, form the positives, and return the loss (not yet backpropagated).

    ``model(x)`` returns (h, z, p) as :class:`nnclr_fast.recipe.models.NNCLR` does. ``queue`` is a
    :class:`nnclr_fast.SupportQueue` (unused for ``method="simclr"``, may be None there).
    For NNCLR the queue is updated in place, after the lookups (see the module docstring).
    ``straight_through=False`` (the default) treats the neighbour as the constant it is, a
    stored embedding; True lets the loss gradient through it to z, as the Keras example does.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    b = x1.shape[0]
    h, z, p = model(torch.cat([x1, x2]))
    # The search, the queue and the loss work in float32 whatever autocast produced.
    z, p = z.float(), p.float()
    h1, h2 = h[:b], h[b:]
    z1, z2 = z[:b], z[b:]
    p1, p2 = p[:b], p[b:]
    if method == "nnclr":
        if queue is None:
            raise ValueError("method='nnclr' needs a support queue")
        positives1 = queue.lookup(z1, straight_through=straight_through)
        positives2 = queue.lookup(z2, straight_through=straight_through)
        queue.enqueue(z1.detach())
    else:
        positives1, positives2 = z1, z2
    loss = nnclr_loss(positives1, positives2, p1, p2, temperature=temperature, variant=loss_variant)
    return StepOutput(loss, h1, h2, z1, positives1, positives2)


class OnlineProbe(nn.Module):
    """A linear classifier trained alongside pre-training on detached features (monitoring
    only: its gradient never reaches the encoder). Label -1 marks unlabelled rows.

    A parameter-free batch norm standardises the features first: their scale drifts as the
    encoder trains, and one probe learning rate should suit every backbone.
    """

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, affine=False)
        self.linear = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features.detach().float()))


def probe_loss_and_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over labelled rows, correct predictions, labelled rows), 0-dim tensors.

    A batch without labels gives a zero loss rather than NaN, decided on the device so the
    step never waits for the host.
    """
    labelled = labels >= 0
    count = labelled.sum()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum") / count.clamp_min(1)
    hits = ((logits.argmax(dim=1) == labels) & labelled).sum()
    return loss, hits, count


class WarmupCosine:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps``. A class (not a lambda) so LambdaLR can checkpoint it."""

    def __init__(self, total_steps: int, warmup_steps: int = 0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.warmup_steps = min(max(warmup_steps, 0), total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only: decaying batch-norm scales and
    biases only fights the normalisation."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if isinstance(param, nn.parameter.UninitializedParameter):
                raise ValueError("a lazy layer has no shape yet: run one batch through the model before grouping its parameters")
            if param.requires_grad:
                (decay if param.dim() > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or sgd")


class DeviceSums:
    """Named running sums kept on the device in float64, so a step never waits for the host;
    read one by name (a host sync) only when it is needed."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            total = self.sums.get(name)
            value = value.detach().to(torch.float64)
            self.sums[name] = value if total is None else total + value

    def get(self, name: str) -> float:
        return float(self.sums[name]) if name in self.sums else 0.0


def train_one_epoch(
    model: nn.Module,
    queue,
    probe: nn.Module,
    augment: Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    batches: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    probe_optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
    method: str = "nnclr",
    temperature: float = 0.1,
    loss_variant: str = "paper",
    straight_through: bool = False,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: Optional[Callable[[int, DeviceSums], None]] = None,
) -> dict[str, float]:
    """One pass over ``batches`` (index tensors into ``images``/``labels``); returns the epoch's
    mean loss, contrastive accuracy and online-probe loss/accuracy on the labelled rows.

    ``probe`` is called as ``probe(features)`` (it may be wrapped in DistributedDataParallel).
    ``progress(step, sums)`` is called after every step with the running :class:`DeviceSums`
    (``loss``, ``contrastive_acc``, ``probe_loss``, ``probe_hits``, ``labelled``).
    """
    model.train()
    probe.train()
    sums = DeviceSums()
    for step, idx in enumerate(batches):
        batch = images[idx].to(device, non_blocking=True)
        batch_labels = labels[idx].to(device, non_blocking=True)
        x1, x2 = augment(batch, generator), augment(batch, generator)
        if channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = contrastive_step(
                model, queue, x1, x2,
                method=method, temperature=temperature, loss_variant=loss_variant, straight_through=straight_through,
            )
        probe_loss, hits, count = probe_loss_and_hits(probe(out.h1.detach()), batch_labels)
        optimizer.zero_grad(set_to_none=True)
        probe_optimizer.zero_grad(set_to_none=True)
        (out.loss + probe_loss).backward()
        optimizer.step()
        probe_optimizer.step()
        scheduler.step()
        sums.add(
            loss=out.loss, contrastive_acc=contrastive_accuracy(out.h1, out.h2),
            probe_loss=probe_loss.double() * count, probe_hits=hits, labelled=count,
        )
        if progress is not None:
            progress(step, sums)
    steps = max(len(batches), 1)
    labelled = sums.get("labelled")
    return {
        "loss": sums.get("loss") / steps,
        "contrastive_acc": sums.get("contrastive_acc") / steps,
        "probe_train_loss": sums.get("probe_loss") / labelled if labelled else float("nan"),
        "probe_train_acc": sums.get("probe_hits") / labelled if labelled else float("nan"),
    }
