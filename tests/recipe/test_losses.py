import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnclr_fast import SupportQueue
from nnclr_fast.losses import contrastive_accuracy, info_nce, nnclr_loss
from nnclr_fast.models import NNCLR, ImageEncoder
from nnclr_fast.training import contrastive_step

A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
C = torch.tensor([[1.0, 0.0], [0.6, 0.8]])


def softplus(x):
    return math.log1p(math.exp(x))


def test_info_nce_matches_a_hand_computed_example():
    # logits = A C^T / 0.5 = [[2, 1.2], [0, 1.6]]; row i must pick column i.
    expected = 0.5 * (softplus(1.2 - 2.0) + softplus(0.0 - 1.6))
    assert info_nce(A, C, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_normalises_its_inputs():
    assert info_nce(3 * A, 0.2 * C, temperature=0.5).item() == pytest.approx(info_nce(A, C, temperature=0.5).item(), rel=1e-6)


def test_paper_loss_is_the_mean_of_the_two_cross_view_terms():
    # NN(z1) = A against p2 = C, and NN(z2) = C against p1 = A (logits [[2, 0], [1.2, 1.6]]).
    expected = 0.5 * (0.5 * (softplus(-0.8) + softplus(-1.6)) + 0.5 * (softplus(-2.0) + softplus(-0.4)))
    assert nnclr_loss(A, C, A, C, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_keras_variant_adds_the_transposed_terms():
    nn1, nn2, p1, p2 = torch.randn(4, 6, 3).unbind(0)
    expected = 0.25 * (info_nce(nn1, p2) + info_nce(p2, nn1) + info_nce(nn2, p1) + info_nce(p1, nn2))
    torch.testing.assert_close(nnclr_loss(nn1, nn2, p1, p2, variant="keras"), expected)
    assert not torch.allclose(nnclr_loss(nn1, nn2, p1, p2, variant="keras"), nnclr_loss(nn1, nn2, p1, p2))


@pytest.mark.parametrize("variant", ["paper", "keras"])
def test_loss_is_symmetric_in_the_two_views(variant):
    nn1, nn2, p1, p2 = torch.randn(4, 8, 5).unbind(0)
    forward = nnclr_loss(nn1, nn2, p1, p2, variant=variant)
    swapped = nnclr_loss(nn2, nn1, p2, p1, variant=variant)
    torch.testing.assert_close(forward, swapped)


def test_default_temperature_is_the_papers_0_1():
    a, c = torch.randn(2, 5, 4).unbind(0)
    torch.testing.assert_close(info_nce(a, c), info_nce(a, c, temperature=0.1))
    assert not torch.allclose(info_nce(a, c), info_nce(a, c, temperature=1.0))


def test_loss_arguments_are_checked():
    with pytest.raises(ValueError, match="variant"):
        nnclr_loss(A, C, A, C, variant="triplet")
    with pytest.raises(ValueError, match="temperature"):
        info_nce(A, C, temperature=0.0)
    with pytest.raises(ValueError, match="shape|\\(B, D\\)"):
        info_nce(A, C[:1])


def test_contrastive_accuracy_counts_both_directions():
    assert contrastive_accuracy(A, A).item() == 1.0
    # Rows: 0 -> 0 right, 1 -> 1 right. Columns: column 1 of [[1, .6], [0, .8]] peaks at row 1, column 0 at row 0.
    assert contrastive_accuracy(A, C).item() == 1.0
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert contrastive_accuracy(A, swapped).item() == 0.0


# ---------------------------------------------------------------------------------------------
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
        self.calls.append("lookup")
        return self.queue.lookup(z, **kwargs)

    def enqueue(self, x):
        self.calls.append("enqueue")
        return self.queue.enqueue(x)


def test_step_looks_up_both_views_before_enqueueing():
    spy = SpyQueue(SupportQueue(64, D))
    contrastive_step(_model(), spy, *_views())
    assert spy.calls == ["lookup", "lookup", "enqueue"]


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
    out = contrastive_step(model, spy, x1, x2, method="simclr")
    assert spy.calls == []
    assert int(spy.queue.count) == 0
    _, z, p = model(torch.cat([x1, x2]))
    torch.testing.assert_close(out.loss, nnclr_loss(z[:B], z[B:], p[:B], p[B:]))
    assert contrastive_step(model, None, x1, x2, method="simclr").loss.isfinite()


def test_nnclr_and_simclr_losses_differ_once_the_queue_has_rows():
    model = _model()
    x1, x2 = _views()
    queue = SupportQueue(64, D)
    queue.enqueue(torch.randn(32, D))
    nnclr = contrastive_step(model, queue, x1, x2, method="nnclr").loss
    simclr = contrastive_step(model, None, x1, x2, method="simclr").loss
    assert not torch.allclose(nnclr, simclr)


def test_step_gradients_reach_the_encoder_in_both_modes():
    for straight_through in (True, False):
        model = _model()
        queue = SupportQueue(64, D)
        queue.enqueue(torch.randn(32, D))
        contrastive_step(model, queue, *_views(), straight_through=straight_through).loss.backward()
        grad = model.encoder.backbone[1].weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_step_rejects_unknown_method_and_missing_queue():
    with pytest.raises(ValueError, match="method"):
        contrastive_step(_model(), None, *_views(), method="byol")
    with pytest.raises(ValueError, match="queue"):
        contrastive_step(_model(), None, *_views(), method="nnclr")


def test_loss_is_computed_in_float32_under_bf16_autocast():
    a, c = torch.randn(2, 16, 32).unbind(0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = info_nce(a, c)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, info_nce(a, c), rtol=1e-6, atol=1e-6)


def test_warmup_cosine_schedule():
    from nnclr_fast.training import WarmupCosine

    f = WarmupCosine(total_steps=110, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert WarmupCosine(5)(0) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(0)


def test_online_probe_ignores_unlabelled_rows_and_never_trains_the_encoder():
    from nnclr_fast.training import OnlineProbe, probe_loss_and_hits

    probe = OnlineProbe(4, 3)
    features = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, -1, 2, -1, -1])
    loss, hits, count = probe_loss_and_hits(probe(features), labels)
    assert int(count) == 3 and 0 <= int(hits) <= 3
    loss.backward()
    assert features.grad is None and probe.linear.weight.grad is not None
    none, _, zero = probe_loss_and_hits(probe(features.detach()), torch.full((6,), -1))
    assert int(zero) == 0 and none.item() == 0.0
