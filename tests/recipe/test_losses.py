import math

import pytest
import torch

from nnclr_fast.recipe.losses import contrastive_accuracy, info_nce, nnclr_loss

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


def test_loss_is_computed_in_float32_under_bf16_autocast():
    a, c = torch.randn(2, 16, 32).unbind(0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = info_nce(a, c)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, info_nce(a, c), rtol=1e-6, atol=1e-6)
