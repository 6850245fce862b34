"""Frozen-feature evaluation: linear probe (all labels and k per class) and k-NN.

The probes are scikit-learn's LogisticRegression and KNeighborsClassifier on features of the
un-augmented images. Linear probes see standardised features; the scaler is fitted on every
training feature (no labels involved), so the few-label probe uses only its k labels per class
but the same unlabelled statistics. k-NN uses cosine similarity (features L2-normalised), the
usual choice for contrastive embeddings.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn


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


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 5) -> float:
    """Test accuracy of a k-nearest-neighbour vote under cosine similarity."""
    from sklearn.neighbors import KNeighborsClassifier

    train_x, train_y, test_x, test_y = _check(train_x, train_y, test_x, test_y)
    if not 1 <= k <= len(train_x):
        raise ValueError(f"k must be in [1, {len(train_x)}], got {k}")

    def unit(x):
        # On the unit sphere Euclidean order equals cosine order.
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return float(KNeighborsClassifier(n_neighbors=k).fit(unit(train_x), train_y).score(unit(test_x), test_y))


def evaluate_features(
    train_x, train_y, test_x, test_y, *, k: int = 5, per_class: int = 5, seeds: Iterable[int] = (0, 1, 2, 3, 4)
) -> dict[str, float]:
    """The three numbers the training script reports for an encoder."""
    few, few_std = few_shot_linear_accuracy(train_x, train_y, test_x, test_y, per_class=per_class, seeds=seeds)
    return {
        "linear_acc": linear_probe_accuracy(train_x, train_y, test_x, test_y),
        "knn_acc": knn_accuracy(train_x, train_y, test_x, test_y, k=k),
        f"linear_acc_{per_class}_per_class": few,
        f"linear_acc_{per_class}_per_class_std": few_std,
    }
