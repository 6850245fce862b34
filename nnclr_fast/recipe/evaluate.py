"""Frozen-feature evaluation: linear probe (all labels and k per class) and k-NN.

Features are those of the un-augmented images. The linear probes are scikit-learn's
LogisticRegression on standardised features; the scaler is fitted on every training feature (no
labels involved), so the few-label probe uses only its k labels per class but the same
unlabelled statistics. The k-NN classifiers run on this library's ``nn_topk`` (on the GPU when
given one) under cosine similarity, the usual choice for contrastive embeddings: a majority vote
at k=5 and the similarity-weighted vote of InstDisc at k=20.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from nnclr_fast.ops import nn_topk


@torch.no_grad()
def extract_features(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 512, device: Optional[torch.device] = None
) -> torch.Tensor:
    """float32 CPU features of ``images`` (any dtype ``model`` accepts), computed in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check(train_x, train_y, test_x, test_y):
    train_x, train_y, test_x, test_y = map(_numpy, (train_x, train_y, test_x, test_y))
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {train_x.shape} and {test_x.shape}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("every feature row needs exactly one label")
    if not (np.isfinite(train_x).all() and np.isfinite(test_x).all()):
        raise ValueError("features contain NaN or Inf")
    return train_x.astype(np.float64), train_y, test_x.astype(np.float64), test_y


def _standardize(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train_x.mean(axis=0)
    # Constant features (dead ReLUs) keep scale 1 instead of dividing by zero.
    std = np.where(train_x.std(axis=0) > 1e-8, train_x.std(axis=0), 1.0)
    return [(x - mean) / std for x in (train_x, *others)]


def _logistic(c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, c: float = 1.0, max_iter: int = 2000) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features."""
    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y)
    tr, te = _standardize(train_x, test_x)
    return float(_logistic(c, max_iter).fit(tr, train_y).score(te, test_y))


def few_shot_linear_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    per_class: int = 5,
    seeds: Iterable[int] = (0, 1, 2, 3, 4),
    c: float = 1.0,
    max_iter: int = 2000,
) -> tuple[float, float]:
    """Mean and std over ``seeds`` of the linear-probe accuracy when only ``per_class``
    labelled examples of each class (drawn with that seed) are available."""
    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y)
    tr, te = _standardize(train_x, test_x)
    classes = np.unique(train_y)
    accs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        picks = []
        for cls in classes:
            members = np.flatnonzero(train_y == cls)
            if len(members) < per_class:
                raise ValueError(f"class {cls} has {len(members)} training examples, fewer than per_class={per_class}")
            picks.append(rng.choice(members, per_class, replace=False))
        idx = np.concatenate(picks)
        accs.append(_logistic(c, max_iter).fit(tr[idx], train_y[idx]).score(te, test_y))
    if not accs:
        raise ValueError("seeds is empty")
    return float(np.mean(accs)), float(np.std(accs))


def knn_predict(
    train_x, train_y, queries, *, k: int = 5, temperature: Optional[float] = None, batch_size: int = 4096, device=None
) -> torch.Tensor:
    """Class labels of ``queries`` by a vote of their ``k`` most cosine-similar training rows.

    ``temperature=None``: majority vote, one vote per neighbour. Otherwise each neighbour votes
    exp(cosine / temperature), the weighted k-NN of InstDisc (Wu et al. 2018) as solo-learn
    reports it. Deterministic: neighbours tied in similarity go to the lower training index
    (nn_topk's rule) and classes tied in votes to the smallest label, which is what
    scikit-learn's ``KNeighborsClassifier(k)`` on L2-normalised features does (tested on digits).

    Runs on ``device`` (default: where ``train_x`` is; tensors already there are not copied) in
    query batches of ``batch_size``: nn_topk streams the bank, so besides the bank memory stays
    O(batch_size x (k + classes)) however many rows it holds.
    """
    if device is None:
        device = train_x.device if isinstance(train_x, torch.Tensor) else "cpu"
    bank, queries = (torch.as_tensor(x, device=device).float() for x in (train_x, queries))
    train_y = torch.as_tensor(train_y, device=device)
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(bank.shape)} and {tuple(queries.shape)}")
    if train_y.shape != (len(bank),):
        raise ValueError("every feature row needs exactly one label")
    if not bool(torch.isfinite(bank).all() & torch.isfinite(queries).all()):
        raise ValueError("features contain NaN or Inf")
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}], got {k}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    classes, codes = torch.unique(train_y, return_inverse=True)
    predictions = []
    for chunk in queries.split(batch_size):
        sims, idx = nn_topk(chunk, bank, k, normalize_queue=True, precision="ieee")
        votes = torch.ones_like(sims) if temperature is None else (sims / temperature).exp()
        totals = torch.zeros(chunk.shape[0], len(classes), device=bank.device).scatter_add_(1, codes[idx], votes)
        # argmax takes the first of equal totals: the smallest label.
        predictions.append(classes[totals.argmax(dim=1)])
    return torch.cat(predictions)


def _accuracy(predicted: torch.Tensor, labels) -> float:
    labels = torch.as_tensor(labels, device=predicted.device)
    if labels.shape != predicted.shape:
        raise ValueError("every feature row needs exactly one label")
    return float((predicted == labels).double().mean())


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 5, batch_size: int = 4096, device=None) -> float:
    """Test accuracy of the majority vote of :func:`knn_predict`."""
    return _accuracy(knn_predict(train_x, train_y, test_x, k=k, batch_size=batch_size, device=device), test_y)


def weighted_knn_accuracy(
    train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07, batch_size: int = 4096, device=None
) -> float:
    """Test accuracy of the similarity-weighted vote of :func:`knn_predict` (InstDisc's
    k=20, T=0.07, the online k-NN monitor of solo-learn)."""
    predicted = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, batch_size=batch_size, device=device)
    return _accuracy(predicted, test_y)


def evaluate_features(
    train_x, train_y, test_x, test_y, *, k: int = 5, per_class: int = 5, seeds: Iterable[int] = (0, 1, 2, 3, 4), device=None
) -> dict[str, float]:
    """The numbers the trainer reports for an encoder: linear probe, k-NN (majority at ``k``
    and weighted at 20), and the few-label linear probe (mean and std over ``seeds``)."""
    few, few_std = few_shot_linear_accuracy(train_x, train_y, test_x, test_y, per_class=per_class, seeds=seeds)
    return {
        "linear_acc": linear_probe_accuracy(train_x, train_y, test_x, test_y),
        "knn_acc": knn_accuracy(train_x, train_y, test_x, test_y, k=k, device=device),
        "weighted_knn_acc": weighted_knn_accuracy(train_x, train_y, test_x, test_y, k=min(20, len(train_y)), device=device),
        f"linear_acc_{per_class}_per_class": few,
        f"linear_acc_{per_class}_per_class_std": few_std,
    }
