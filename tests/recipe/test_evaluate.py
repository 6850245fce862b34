import numpy as np
import pytest
import torch
from torch import nn

from nnclr_fast.recipe.evaluate import (
    evaluate_features,
    extract_features,
    few_shot_linear_accuracy,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    weighted_knn_accuracy,
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
    assert r["linear_acc"] == 1.0 and r["knn_acc"] == 1.0 and r["weighted_knn_acc"] == 1.0
    assert r["linear_acc_5_per_class"] == 1.0 and r["linear_acc_5_per_class_std"] == 0.0


def test_uninformative_features_score_near_chance():
    rng = np.random.default_rng(1)
    x_tr, x_te = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    y_tr, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    assert linear_probe_accuracy(x_tr, y_tr, x_te, y_te) < 0.4
    assert knn_accuracy(x_tr, y_tr, x_te, y_te) < 0.4
    assert weighted_knn_accuracy(x_tr, y_tr, x_te, y_te) < 0.4
    assert few_shot_linear_accuracy(x_tr, y_tr, x_te, y_te)[0] < 0.4


def test_knn_uses_cosine_similarity():
    # Same direction, very different lengths: Euclidean 1-NN would pick the wrong class.
    train = np.array([[10.0, 0.0], [0.0, 1.0]])
    test = np.array([[1.0, 0.05]])
    assert knn_accuracy(train, [0, 1], test, [0], k=1) == 1.0
    assert weighted_knn_accuracy(train, [0, 1], test, [0], k=1) == 1.0


def test_few_shot_fits_on_k_labels_per_class_drawn_per_seed(monkeypatch):
    import nnclr_fast.recipe.evaluate as ev

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
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(x, y, x, y, k=len(x) + 1)
    with pytest.raises(ValueError, match="NaN"):
        knn_accuracy(np.full_like(x, np.inf), y, x, y)
    with pytest.raises(ValueError, match="one label"):
        knn_accuracy(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="one label"):
        knn_accuracy(x, y, x, y[:-1])
    with pytest.raises(ValueError, match="temperature"):
        weighted_knn_accuracy(x, y, x, y, temperature=0.0)
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


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@pytest.fixture(scope="module")
def digits_features():
    """Digits features of two kinds: raw pixels (integer-valued, so exact distance ties occur)
    and a randomly initialised small encoder's."""
    from nnclr_fast.recipe.data import load_digits_splits
    from nnclr_fast.recipe.models import build_feature_extractor

    data = load_digits_splits()
    pixels = [s.images.reshape(len(s), -1).float() for s in (data.train, data.test)]
    torch.manual_seed(0)
    spec = dict(backbone="small", in_channels=1, image_size=16, width=32, batch_norm=True, dense=False, mean=[0.3], std=[0.4])
    encoder = build_feature_extractor(spec)
    learned = [extract_features(encoder, s.images) for s in (data.train, data.test)]
    return {"pixels": pixels, "encoder": learned}, data.train.labels, data.test.labels


@pytest.mark.parametrize("kind", ["pixels", "encoder"])
@pytest.mark.parametrize("k", [1, 4, 5, 20])
def test_majority_knn_predicts_exactly_what_scikit_learn_does_on_digits(digits_features, kind, k):
    from sklearn.neighbors import KNeighborsClassifier

    features, train_y, test_y = digits_features
    train_x, test_x = features[kind]
    expected = KNeighborsClassifier(k).fit(_unit(train_x.double().numpy()), train_y.numpy()).predict(_unit(test_x.double().numpy()))
    np.testing.assert_array_equal(knn_predict(train_x, train_y, test_x, k=k).numpy(), expected)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=k) == float(np.mean(expected == test_y.numpy()))


def test_vote_ties_go_to_the_smallest_label():
    # Two neighbours, one per class: the majority vote is tied and label 3 beats label 7.
    train = torch.tensor([[1.0, 0.1], [1.0, -0.1]])
    assert knn_predict(train, [7, 3], torch.tensor([[1.0, 0.0]]), k=2).tolist() == [3]
    assert knn_predict(train, [3, 7], torch.tensor([[1.0, 0.0]]), k=2).tolist() == [3]


def _weighted_reference(train_x, train_y, test_x, k, t):
    """solo-learn's WeightedKNNClassifier, in float64."""
    sims = _unit(test_x) @ _unit(train_x).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    classes = np.unique(train_y)
    scores = np.zeros((len(test_x), len(classes)))
    for row, (ids, s) in enumerate(zip(idx, np.take_along_axis(sims, idx, axis=1))):
        np.add.at(scores[row], np.searchsorted(classes, train_y[ids]), np.exp(s / t))
    return classes[scores.argmax(axis=1)]


def test_weighted_knn_weights_each_neighbour_by_exp_similarity_over_t():
    # One very close neighbour of class 0 outweighs two farther ones of class 1 at T=0.07,
    # while a majority vote (or a high temperature) sides with class 1.
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    query, labels = np.array([[1.0, 0.05]]), [0, 1, 1]
    assert weighted_knn_accuracy(train, labels, query, [0], k=3) == 1.0
    assert weighted_knn_accuracy(train, labels, query, [1], k=3, temperature=10.0) == 1.0
    assert knn_accuracy(train, labels, query, [1], k=3) == 1.0


def test_weighted_knn_matches_a_float64_reference_on_digits_in_any_batch_size(digits_features):
    features, train_y, test_y = digits_features
    train_x, test_x = features["encoder"]
    expected = _weighted_reference(train_x.double().numpy(), train_y.numpy(), test_x.double().numpy(), 20, 0.07)
    for batch_size in (7, 4096):
        got = knn_predict(train_x, train_y, test_x, k=20, temperature=0.07, batch_size=batch_size)
        np.testing.assert_array_equal(got.numpy(), expected)
    assert weighted_knn_accuracy(train_x, train_y, test_x, test_y) == float(np.mean(expected == test_y.numpy()))


def test_knn_keeps_tensors_on_their_device_and_scores_unnormalised_rows_by_cosine():
    train = torch.tensor([[3.0, 0.0], [0.0, 0.2]])
    queries = torch.tensor([[0.5, 0.45], [0.1, 0.0]])
    assert knn_predict(train, torch.tensor([4, 9]), queries, k=1).tolist() == [4, 4]
    assert knn_predict(train, torch.tensor([4, 9]), torch.tensor([[0.1, 0.2]]), k=1, device="cpu").tolist() == [9]
