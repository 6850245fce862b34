"""One NNCLR (or SimCLR) training step, the online probe, the schedule and an epoch loop.

Order inside a step (the reason this module exists rather than a free-form loop):

1. both views go through the model in one batch (one forward, so batch norm sees both views,
   as in SimCLR, and DDP sees a single forward per backward);
2. both projections are LOOKED UP in the support set;
3. only then are the view-1 projections ENQUEUED.

Both views are searched in ONE lookup of their 2B stacked projections, so the support set is
streamed once per step, not once per view.

Looking up after enqueueing would put z1 itself in the support set, so NN(z1) = z1 and the
"nearest neighbour" positive degenerates into the view's own embedding (a SimCLR step in
disguise, and z2's neighbour would mostly be its own pair's z1). What goes in is what the
support set is searched with: projections z (not backbone features), L2-normalised, detached
(the queue is a memory, never a path for gradients), of one view per image. The paper updates
the support set with the current batch's embeddings at the end of each step; the Keras
example enqueues the first view's projections after its lookups, as lightly's NNCLR example
does with one view's projections; so does this step.

NNCLR's own health signal is the NN accuracy (solo-learn's ``train_nn_acc``): the share of
queries whose looked-up neighbour carries the query's label. It needs the labels of the stored
rows, which a :class:`LabelQueue` keeps beside the support queue, enqueued in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnclr_fast.ops.common import int_in_range
from nnclr_fast.ops.support_queue import all_gather_rows
from nnclr_fast.recipe.losses import LOSS_VARIANTS, contrastive_accuracy, nnclr_loss

METHODS = ("nnclr", "simclr")


@dataclass(frozen=True)
class StepSettings:
    """How one training step forms its loss (built from a TrainConfig by ``step_settings()``).

    ``straight_through=False`` (the default) treats the neighbour as the constant it is, a
    stored embedding; True lets the loss gradient through it to z, as the Keras example does.
    """

    method: str = "nnclr"
    temperature: float = 0.1
    loss_variant: str = "paper"
    straight_through: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.loss_variant not in LOSS_VARIANTS:
            raise ValueError(f"unknown loss_variant {self.loss_variant!r}; choose one of {', '.join(LOSS_VARIANTS)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


class LabelQueue(nn.Module):
    """The labels of a :class:`~nnclr_fast.SupportQueue`'s rows, for the NN accuracy.

    Fed the same batches in the same order as the support queue (``enqueue`` right after the
    queue's), it writes them with the enqueue op's ring-buffer rule (row i of a batch goes to
    slot ``(ptr + i) % size``, a batch larger than the queue keeps its last ``size`` rows), so
    ``labels[j]`` is the label of the image whose projection sits in bank row j. -1 marks an
    unfilled slot or an unlabelled image. ``labels`` and ``ptr`` are persistent buffers, saved
    in checkpoints with the queue.
    """

    labels: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int):
        super().__init__()
        size = int_in_range("size", size)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, labels: torch.Tensor, *, gather: bool = False) -> None:
        """Append ``labels`` (B,) int64; ``gather``: all-gather every rank's first, in rank
        order, as the support queue does under DDP (pass its ``gathers()``)."""
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"labels must be a 1-D int64 tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        if gather:
            labels = all_gather_rows(labels)
        size, batch = self.labels.shape[0], labels.shape[0]
        first = max(0, batch - size)
        # Slots from the device-side pointer: no host sync, as in the support queue's enqueue.
        slots = (self.ptr + first + torch.arange(batch - first, device=self.labels.device)) % size
        self.labels.index_copy_(0, slots, labels[first:].to(self.labels.device))
        self.ptr.copy_((self.ptr + batch) % size)

    def at(self, indices: torch.Tensor) -> torch.Tensor:
        """The labels of bank rows ``indices``; -1 where an index is -1 (nothing was found)."""
        found = indices >= 0
        return torch.where(found, self.labels[indices.clamp_min(0)], torch.full_like(indices, -1))


def neighbour_label_matches(neighbour_labels: torch.Tensor, query_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(matches, counted), 0-dim tensors: over the queries whose own label and whose
    neighbour's label are both known (>= 0), how many of the two agree. Decided on the device."""
    counted = (query_labels >= 0) & (neighbour_labels >= 0)
    return ((neighbour_labels == query_labels) & counted).sum(), counted.sum()


@dataclass
class StepOutput:
    loss: torch.Tensor
    h1: torch.Tensor
    h2: torch.Tensor
    z1: torch.Tensor
    positives1: torch.Tensor
    positives2: torch.Tensor
    # The bank rows both views were paired with (2B,; -1: none yet); None for SimCLR.
    indices: Optional[torch.Tensor] = None


def contrastive_step(
    model: nn.Module,
    queue,
    x1: torch.Tensor,
    x2: torch.Tensor,
    settings: StepSettings = StepSettings(),
) -> StepOutput:
    """Forward both views, form the positives, and return the loss (not yet backpropagated).

    ``model(x)`` returns (h, z, p) as :class:`nnclr_fast.recipe.models.NNCLR` does. ``queue`` is a
    :class:`nnclr_fast.SupportQueue` (unused for SimCLR, may be None there). For NNCLR the queue
    is searched once for both views, then updated in place (see the module docstring).
    """
    b = x1.shape[0]
    h, z, p = model(torch.cat([x1, x2]))
    # The search, the queue and the loss work in float32 whatever autocast produced.
    z, p = z.float(), p.float()
    h1, h2 = h[:b], h[b:]
    z1, z2 = z[:b], z[b:]
    p1, p2 = p[:b], p[b:]
    indices = None
    if settings.method == "nnclr":
        if queue is None:
            raise ValueError("method='nnclr' needs a support queue")
        positives, indices = queue.lookup(z, straight_through=settings.straight_through, return_indices=True)
        positives1, positives2 = positives[:b], positives[b:]
        queue.enqueue(z1.detach())
    else:
        positives1, positives2 = z1, z2
    loss = nnclr_loss(positives1, positives2, p1, p2, temperature=settings.temperature, variant=settings.loss_variant)
    return StepOutput(loss, h1, h2, z1, positives1, positives2, indices)


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
    settings: StepSettings = StepSettings(),
    label_queue: Optional[LabelQueue] = None,
    generator: Optional[torch.Generator] = None,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: Optional[Callable[[int, DeviceSums], None]] = None,
) -> dict[str, Optional[float]]:
    """One pass over ``batches`` (index tensors into ``images``/``labels``); returns the epoch's
    mean loss, contrastive accuracy, online-probe loss/accuracy on the labelled rows and, for
    NNCLR with a ``label_queue``, the NN accuracy (``nn_acc``: the share of queries of both
    views, among those whose own and whose neighbour's labels are known, whose neighbour has
    their label; None when not measured, NaN when nothing could be counted).

    ``probe`` is called as ``probe(features)`` (it may be wrapped in DistributedDataParallel).
    ``label_queue`` must have been fed the same batches as ``queue`` so far (see LabelQueue).
    ``progress(step, sums)`` is called after every step with the running :class:`DeviceSums`
    (``loss``, ``contrastive_acc``, ``probe_loss``, ``probe_hits``, ``labelled``, and
    ``nn_matches`` / ``nn_counted`` when the NN accuracy is measured).
    """
    measure_nn = settings.method == "nnclr" and label_queue is not None
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
            out = contrastive_step(model, queue, x1, x2, settings)
        if measure_nn:
            # The labels as they were at the lookup, then this batch's, as the queue got its rows.
            matches, counted = neighbour_label_matches(label_queue.at(out.indices), batch_labels.repeat(2))
            label_queue.enqueue(batch_labels, gather=queue.gathers())
            sums.add(nn_matches=matches, nn_counted=counted)
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
    labelled, nn_counted = sums.get("labelled"), sums.get("nn_counted")
    return {
        "loss": sums.get("loss") / steps,
        "contrastive_acc": sums.get("contrastive_acc") / steps,
        "probe_train_loss": sums.get("probe_loss") / labelled if labelled else float("nan"),
        "probe_train_acc": sums.get("probe_hits") / labelled if labelled else float("nan"),
        "nn_acc": (sums.get("nn_matches") / nn_counted if nn_counted else float("nan")) if measure_nn else None,
    }
