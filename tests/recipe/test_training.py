import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnclr_fast import SupportQueue
from nnclr_fast.ops.reference import reference_enqueue
from nnclr_fast.recipe.losses import nnclr_loss
from nnclr_fast.recipe.models import NNCLR, ImageEncoder
from nnclr_fast.recipe.training import (
    DeviceSums,
    LabelQueue,
    OnlineProbe,
    StepSettings,
    WarmupCosine,
    contrastive_step,
    neighbour_label_matches,
    parameter_groups,
    probe_loss_and_hits,
    train_one_epoch,
)

# The training step: simclr/nnclr switch and lookup-before-enqueue.

B, D = 6, 8


def _model():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())
    return NNCLR(ImageEncoder(backbone, 16, [0.5] * 3, [0.5] * 3), proj_hidden_dim=32, proj_dim=D, pred_hidden_dim=32)


def _views():
    return torch.rand(B, 3, 4, 4), torch.rand(B, 3, 4, 4)


class SpyQueue:
    """Records the order of calls, then delegates to a real SupportQueue."""

    def __init__(self, queue):
        self.queue = queue
        self.calls = []

    def lookup(self, z, **kwargs):
        self.calls.append(("lookup", z.shape[0]))
        return self.queue.lookup(z, **kwargs)

    def enqueue(self, x):
        self.calls.append(("enqueue", x.shape[0]))
        return self.queue.enqueue(x)

    def gathers(self):
        return self.queue.gathers()


def test_step_looks_up_both_views_in_one_call_before_enqueueing():
    spy = SpyQueue(SupportQueue(64, D))
    out = contrastive_step(_model(), spy, *_views())
    assert spy.calls == [("lookup", 2 * B), ("enqueue", B)]
    assert out.indices.shape == (2 * B,) and (out.indices == -1).all()  # the queue was empty


def test_one_lookup_of_both_views_finds_what_two_lookups_find():
    queue = SupportQueue(64, D)
    # One-hot rows: every similarity is exactly representable, so the two searches cannot differ.
    queue.enqueue(torch.eye(D).repeat(4, 1))
    model = _model()
    x1, x2 = _views()
    out = contrastive_step(model, queue, x1, x2)
    _, z, _ = model(torch.cat([x1, x2]))
    fresh = SupportQueue(64, D)
    fresh.enqueue(torch.eye(D).repeat(4, 1))
    _, idx1 = fresh.lookup(z[:B], return_indices=True)
    _, idx2 = fresh.lookup(z[B:], return_indices=True)
    torch.testing.assert_close(out.indices, torch.cat([idx1, idx2]), rtol=0, atol=0)


def test_a_view_is_never_its_own_neighbour():
    queue = SupportQueue(64, D)
    queue.enqueue(torch.randn(32, D))
    out = contrastive_step(_model(), queue, *_views())
    # Had z1 been enqueued before the lookup, NN(z1) would be z1 itself: cosine exactly 1.
    cos = F.cosine_similarity(out.positives1, out.z1, dim=1)
    assert (cos < 0.999).all(), cos
    assert int(queue.count) == 32 + B


def test_step_enqueues_the_detached_view1_projections():
    queue = SupportQueue(64, D)
    out = contrastive_step(_model(), queue, *_views())
    assert int(queue.count) == B
    torch.testing.assert_close(queue.bank[:B], F.normalize(out.z1.detach(), dim=1))
    assert not queue.bank.requires_grad
    # The first step of a run has an empty support set: each view is its own positive.
    torch.testing.assert_close(out.positives1, F.normalize(out.z1, dim=1))


def test_simclr_uses_the_same_pipeline_without_the_queue():
    spy = SpyQueue(SupportQueue(64, D))
    model = _model()
    x1, x2 = _views()
    simclr = StepSettings(method="simclr")
    out = contrastive_step(model, spy, x1, x2, simclr)
    assert spy.calls == [] and out.indices is None
    assert int(spy.queue.count) == 0
    _, z, p = model(torch.cat([x1, x2]))
    torch.testing.assert_close(out.loss, nnclr_loss(z[:B], z[B:], p[:B], p[B:]))
    assert contrastive_step(model, None, x1, x2, simclr).loss.isfinite()


def test_nnclr_and_simclr_losses_differ_once_the_queue_has_rows():
    model = _model()
    x1, x2 = _views()
    queue = SupportQueue(64, D)
    queue.enqueue(torch.randn(32, D))
    nnclr = contrastive_step(model, queue, x1, x2, StepSettings(method="nnclr")).loss
    simclr = contrastive_step(model, None, x1, x2, StepSettings(method="simclr")).loss
    assert not torch.allclose(nnclr, simclr)


def test_step_gradients_reach_the_encoder_in_both_modes():
    for straight_through in (True, False):
        model = _model()
        queue = SupportQueue(64, D)
        queue.enqueue(torch.randn(32, D))
        contrastive_step(model, queue, *_views(), StepSettings(straight_through=straight_through)).loss.backward()
        grad = model.encoder.backbone[1].weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_step_gradient_is_the_chosen_modes():
    # The step's gradient equals the loss written out by hand with its mode's positives: the
    # stored neighbour as a constant (False), or normalize(z) + (nn - normalize(z)).detach()
    # (True). The two modes' gradients differ, so swapping them cannot pass.
    torch.manual_seed(3)
    model, views = _model(), _views()
    queue = SupportQueue(64, D)
    queue.enqueue(torch.randn(32, D))
    snapshot = {k: v.clone() for k, v in queue.state_dict().items()}
    grads = {}
    for straight_through in (True, False):
        queue.load_state_dict(snapshot)
        out = contrastive_step(model, queue, *views, StepSettings(straight_through=straight_through))
        got = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)

        queue.load_state_dict(snapshot)
        _, z, p = model(torch.cat(views))
        z, p = z.float(), p.float()
        positives = []
        for zv in (z[:B], z[B:]):
            nn_row = queue.lookup(zv.detach(), straight_through=False)
            zn = F.normalize(zv, dim=1)
            positives.append(zn + (nn_row - zn).detach() if straight_through else nn_row)
        loss = nnclr_loss(positives[0], positives[1], p[:B], p[B:])
        torch.testing.assert_close(out.loss, loss)
        want = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for g_got, g_want in zip(got, want):
            assert (g_got is None) == (g_want is None)
            if g_got is not None:
                torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)
        grads[straight_through] = torch.cat([g.flatten() for g in got if g is not None])
    assert not torch.allclose(grads[True], grads[False], atol=1e-4, rtol=1e-3)


def test_step_settings_reject_bad_values_and_the_step_a_missing_queue():
    with pytest.raises(ValueError, match="method 'byol'"):
        StepSettings(method="byol")
    with pytest.raises(ValueError, match="loss_variant 'x'"):
        StepSettings(loss_variant="x")
    with pytest.raises(ValueError, match="temperature"):
        StepSettings(temperature=0.0)
    with pytest.raises(ValueError, match="queue"):
        contrastive_step(_model(), None, *_views(), StepSettings(method="nnclr"))


def test_label_queue_follows_the_support_queue_through_wraps_and_oversized_batches():
    size = 7
    queue, labels = SupportQueue(size, size + 40), LabelQueue(size)
    seen = 0
    for batch in (3, 5, 1, 9, 2, 7):
        y = torch.arange(seen, seen + batch)
        # Row i of the bank is one-hot at its own label, so the bank itself says which label it holds.
        queue.enqueue(F.one_hot(y, size + 40).float())
        labels.enqueue(y)
        seen += batch
        filled = queue.bank[: int(queue.count)]
        assert torch.equal(labels.labels[: int(queue.count)], filled.argmax(dim=1)), batch
        assert int(labels.ptr) == int(queue.ptr)
    assert int(queue.count) == size and (labels.labels >= 0).all()
    # The same state the reference enqueue gives for the same stream.
    ref = (torch.zeros(size, size + 40), torch.tensor(0), torch.tensor(0))
    seen = 0
    for batch in (3, 5, 1, 9, 2, 7):
        ref = reference_enqueue(*ref, F.one_hot(torch.arange(seen, seen + batch), size + 40).float())
        seen += batch
    assert torch.equal(labels.labels, ref[0].argmax(dim=1))


def test_label_queue_lookup_state_and_errors():
    labels = LabelQueue(4)
    assert labels.labels.tolist() == [-1] * 4
    labels.enqueue(torch.tensor([5, 6]))
    assert labels.at(torch.tensor([1, 0, -1, 3])).tolist() == [6, 5, -1, -1]
    restored = LabelQueue(4)
    restored.load_state_dict(labels.state_dict())
    assert torch.equal(restored.labels, labels.labels) and int(restored.ptr) == 2
    with pytest.raises(ValueError, match="1-D int64"):
        labels.enqueue(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="size"):
        LabelQueue(0)
    with pytest.raises(TypeError, match="size"):
        LabelQueue(2.5)


def test_neighbour_label_matches_count_only_known_labels():
    neighbours = torch.tensor([3, 3, -1, 2, 2, -1])
    queries = torch.tensor([3, 1, 3, -1, 2, -1])
    matches, counted = neighbour_label_matches(neighbours, queries)
    assert (int(matches), int(counted)) == (2, 3)


def test_warmup_cosine_schedule():
    f = WarmupCosine(total_steps=110, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert WarmupCosine(5)(0) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(0)


def test_online_probe_ignores_unlabelled_rows_and_never_trains_the_encoder():
    probe = OnlineProbe(4, 3)
    features = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, -1, 2, -1, -1])
    loss, hits, count = probe_loss_and_hits(probe(features), labels)
    assert int(count) == 3 and 0 <= int(hits) <= 3
    loss.backward()
    assert features.grad is None and probe.linear.weight.grad is not None
    none, _, zero = probe_loss_and_hits(probe(features.detach()), torch.full((6,), -1))
    assert int(zero) == 0 and none.item() == 0.0


def test_parameter_groups_decay_matrices_only_and_refuse_unsized_lazy_layers():
    model = _model()
    decay, no_decay = parameter_groups([model], 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    lazy = NNCLR(nn.Sequential(nn.Flatten(), nn.Linear(48, 16)), proj_hidden_dim=32, proj_dim=D, pred_hidden_dim=32)
    with pytest.raises(ValueError, match="run one batch"):
        parameter_groups([lazy], 0.1)


def test_device_sums_add_by_name_in_float64():
    sums = DeviceSums()
    assert sums.get("loss") == 0.0
    sums.add(loss=torch.tensor(1.5), hits=torch.tensor(3))
    sums.add(loss=torch.tensor(0.25, requires_grad=True), hits=torch.tensor(2))
    assert sums.get("loss") == 1.75 and sums.get("hits") == 5.0
    assert sums.sums["loss"].dtype == torch.float64 and not sums.sums["loss"].requires_grad


def test_train_one_epoch_reports_named_means_and_steps_the_schedule():
    model, probe = _model(), OnlineProbe(16, 3)
    queue = SupportQueue(64, D)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    probe_optimizer = torch.optim.SGD(probe.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(10))
    images = torch.randint(0, 256, (18, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, -1, -1, -1] * 3)
    seen = []
    label_queue = LabelQueue(64)
    metrics = train_one_epoch(
        model, queue, probe, lambda x, g: x.float() / 255, images, labels, list(torch.arange(18).split(B)),
        optimizer, probe_optimizer, scheduler, device=torch.device("cpu"), label_queue=label_queue,
        progress=lambda step, sums: seen.append((step, sums.get("labelled"), sums.get("nn_counted"))),
    )
    assert set(metrics) == {"loss", "contrastive_acc", "probe_train_loss", "probe_train_acc", "nn_acc"}
    # Step 0 searches an empty queue; later steps count labelled queries with labelled neighbours.
    assert [(step, labelled) for step, labelled, _ in seen] == [(0, 3.0), (1, 6.0), (2, 9.0)]
    assert seen[0][2] == 0.0 and seen[2][2] > 0
    assert int(queue.count) == 18 and scheduler.last_epoch == 3
    assert torch.equal(label_queue.labels[:18], labels) and int(label_queue.ptr) == 18
    assert metrics["loss"] > 0 and 0 <= metrics["probe_train_acc"] <= 1 and 0 <= metrics["nn_acc"] <= 1


def test_nn_accuracy_is_the_share_of_neighbours_with_the_query_label():
    # An identity "model" on one-hot images: every query's nearest stored row is its own class's,
    # so once the queue holds each class the NN accuracy is exactly 1; with shuffled stored labels 0.
    class OneHot(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            flat = x.flatten(1) * self.scale
            return flat, flat, flat

    classes = 4
    images = torch.eye(classes).repeat(3, 1).view(-1, 1, 1, classes)
    labels = torch.arange(classes).repeat(3)
    batches = [torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)]
    results = {}
    for name, stored_labels in (("right", labels), ("wrong", (labels + 1) % classes)):
        model, probe = OneHot(), OnlineProbe(classes, classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        probe_optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(10))
        queue, label_queue = SupportQueue(16, classes), LabelQueue(16)
        # The first batch is enqueued by hand with the labels under test.
        queue.enqueue(images[:4].flatten(1))
        label_queue.enqueue(stored_labels[:4])
        results[name] = train_one_epoch(
            model, queue, probe, lambda x, g: x, images, labels, batches[1:], optimizer, probe_optimizer, scheduler,
            device=torch.device("cpu"), label_queue=label_queue,
        )["nn_acc"]
    assert results == {"right": 1.0, "wrong": 0.0}


def test_simclr_epochs_report_no_nn_accuracy():
    model, probe = _model(), OnlineProbe(16, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    probe_optimizer = torch.optim.SGD(probe.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(10))
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
    metrics = train_one_epoch(
        model, None, probe, lambda x, g: x.float() / 255, images, torch.zeros(12, dtype=torch.int64), [torch.arange(6), torch.arange(6, 12)],
        optimizer, probe_optimizer, scheduler, device=torch.device("cpu"), settings=StepSettings(method="simclr"),
        label_queue=LabelQueue(8),
    )
    assert metrics["nn_acc"] is None
