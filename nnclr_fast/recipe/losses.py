"""NNCLR's contrastive loss and the Keras example's monitoring metric.

The paper's loss for view 1 (Dwibedi et al. 2021, eq. 2, temperature 0.1) is

    L_i = -log  exp(NN(z1_i) . p2_i / t)  /  sum_k exp(NN(z1_i) . p2_k / t)

with every vector L2-normalised; the total is symmetrised by swapping the views and averaging.
The Keras example additionally contrasts each batch in the other direction (columns of the
same similarity matrix), which gives four cross-entropy terms instead of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_VARIANTS = ("paper", "keras")


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean cross-entropy of anchor i choosing candidate i among all candidates of the batch.

    Both sides are L2-normalised and the logits are formed in float32, so the loss is the same
    under bf16 autocast (a 0.1 temperature amplifies bf16 rounding tenfold otherwise).
    """
    if anchors.shape != candidates.shape or anchors.dim() != 2:
        raise ValueError(f"anchors and candidates must both be (B, D), got {tuple(anchors.shape)} and {tuple(candidates.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    # Inside an autocast region the matmul would otherwise run in bf16 despite float32 inputs.
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = F.normalize(anchors.float(), dim=1)
        c = F.normalize(candidates.float(), dim=1)
        logits = a @ c.T / temperature
        labels = torch.arange(a.shape[0], device=a.device)
        return F.cross_entropy(logits, labels)


def nnclr_loss(
    positives1: torch.Tensor,
    positives2: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    *,
    temperature: float = 0.1,
    variant: str = "paper",
) -> torch.Tensor:
    """Symmetric NT-Xent between the positives of one view and the predictions of the other.

    ``positives1``/``positives2`` are NN(z1)/NN(z2) for NNCLR, or z1/z2 themselves for the
    SimCLR baseline. ``variant="paper"`` averages NN(z1)->p2 and NN(z2)->p1;
    ``variant="keras"`` also adds p2->NN(z1) and p1->NN(z2) and averages the four.
    """
    if variant == "paper":
        return 0.5 * (info_nce(positives1, p2, temperature) + info_nce(positives2, p1, temperature))
    if variant == "keras":
        return 0.25 * (
            info_nce(positives1, p2, temperature)
            + info_nce(p2, positives1, temperature)
            + info_nce(positives2, p1, temperature)
            + info_nce(p1, positives2, temperature)
        )
    raise ValueError(f"unknown loss variant {variant!r}; choose one of {', '.join(LOSS_VARIANTS)}")


@torch.no_grad()
def contrastive_accuracy(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """How often a view's most similar partner in the batch is the other view of its own image.

    Counted in both directions (rows and columns of the cosine similarity matrix), as the
    Keras example does; 1/B is chance. Returns a 0-dim float tensor (no host sync).
    """
    sims = F.normalize(f1.float(), dim=1) @ F.normalize(f2.float(), dim=1).T
    labels = torch.arange(sims.shape[0], device=sims.device)
    hits = (sims.argmax(dim=1) == labels).float().sum() + (sims.argmax(dim=0) == labels).float().sum()
    return hits / (2 * sims.shape[0])
