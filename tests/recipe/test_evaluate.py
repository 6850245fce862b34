import numpy as np
import pytest
import torch
from torch import nn

from nnclr_fast.evaluate import (
    evaluate_features,
    extract_features,
    few_shot_linear_accuracy,
    knn_accuracy,
    linear_probe_accuracy,
)


def clusters(n_per_class=30, classes=4, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 5
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat(np.arange(classes), n_per_class)
    return x, y


def test_separable_features_score_perfectly():
    x_tr, y_tr = clusters(seed=0)
    x_te, y_te = clusters(n_per_class=10, seed=0)
    r = evaluate_features(x_tr, y_tr, x_te, y_te)
    assert r["linear_acc"] == 1.0 and r["knn_acc"] == 1.0
    assert r["linear_acc_5_per_class"] == 1.0 and r["linear_acc_5_per_class_std"] == 0.0


def test_uninformative_features_score_near_chance():
    rng = np.random.default_rng(1)
    x_tr, x_te = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    y_tr, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    assert linear_probe_accuracy(x_tr, y_tr, x_te, y_te) < 0.4
    assert knn_accuracy(x_tr, y_tr, x_te, y_te) < 0.4
    assert few_shot_linear_accuracy(x_tr, y_tr, x_te, y_te)[0] < 0.4


def test_knn_uses_cosine_similarity():
    # Same direction, very different lengths: Euclidean 1-NN would pick the wrong class.
    train = np.array([[10.0, 0.0], [0.0, 1.0]])
    test = np.array([[1.0, 0.05]])
    assert knn_accuracy(train, [0, 1], test, [0], k=1) == 1.0


def test_few_shot_fits_on_k_labels_per_class_drawn_per_seed(monkeypatch):
    import nnclr_fast.evaluate as ev

    fits = []
    real = ev._logistic

    class Recording:
        def __init__(self, *args):
            self.inner = real(*args)

        def fit(self, x, y):
            fits.append((x.copy(), np.asarray(y).copy()))
            self.inner.fit(x, y)
            return self

        def score(self, x, y):
            return self.inner.score(x, y)

    monkeypatch.setattr(ev, "_logistic", Recording)
    x, y = clusters(n_per_class=30, classes=4)
    mean, std = few_shot_linear_accuracy(x, y, x, y, per_class=5, seeds=(0, 1, 2))
    assert len(fits) == 3
    for fx, fy in fits:
        assert fx.shape == (20, 16) and np.bincount(fy).tolist() == [5, 5, 5, 5]
    assert not np.array_equal(fits[0][0], fits[1][0])
    assert mean == 1.0 and std == 0.0
    with pytest.raises(ValueError, match="fewer than per_class"):
        few_shot_linear_accuracy(x, y, x, y, per_class=31)


def test_feature_checks():
    x, y = clusters()
    with pytest.raises(ValueError, match="NaN"):
        linear_probe_accuracy(np.full_like(x, np.nan), y, x, y)
    with pytest.raises(ValueError, match="same D"):
        knn_accuracy(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(x, y, x, y, k=0)
    # Torch tensors are accepted as well as arrays.
    assert knn_accuracy(torch.from_numpy(x), torch.from_numpy(y), x, y) == 1.0


def test_extract_features_runs_in_eval_mode_and_restores_the_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.train()
    images = torch.rand(10, 1, 2, 2)
    feats = extract_features(model, images, batch_size=3)
    assert model.training
    assert feats.shape == (10, 3) and feats.dtype == torch.float32 and not feats.requires_grad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, model(images))
