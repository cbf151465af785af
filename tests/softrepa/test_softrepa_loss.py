"""The contrastive score-matching loss as a pure function of the error matrix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from softrepa.loss import contrastive_logits, error_matrix, retrieval_accuracy, softrepa_loss


def test_logits_are_scaled_exponentials_of_minus_error():
    e = torch.tensor([[0.0, 0.07], [0.14, 0.0]])
    logits = contrastive_logits(e, scale=4.0, temperature=0.07)
    assert torch.allclose(logits, torch.tensor([[4.0, 4 * math.exp(-1)], [4 * math.exp(-2), 4.0]]))


def test_loss_is_cross_entropy_towards_each_images_positive_column():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(3, 5, generator=g) * 0.3
    pos = torch.tensor([4, 0, 2])  # positives need not sit on the diagonal
    out = softrepa_loss(e, pos)
    ref = F.cross_entropy(4.0 * torch.exp(-e / 0.07), pos)
    assert torch.allclose(out.loss, ref) and torch.allclose(out.contrastive, ref)
    assert torch.allclose(out.denoise, e[[0, 1, 2], [4, 0, 2]].mean())


def test_denoise_weight_adds_the_positives_error():
    e = torch.tensor([[0.1, 0.3], [0.2, 0.05]])
    pos = torch.tensor([0, 1])
    plain = softrepa_loss(e, pos).loss
    weighted = softrepa_loss(e, pos, denoise_weight=10.0).loss
    assert torch.allclose(weighted - plain, torch.tensor(10.0 * (0.1 + 0.05) / 2))


def test_lower_positive_error_lowers_the_loss_and_the_gradient_says_so():
    e = torch.tensor([[0.20, 0.25, 0.30], [0.30, 0.20, 0.25]], requires_grad=True)
    pos = torch.tensor([0, 1])
    out = softrepa_loss(e, pos)
    out.loss.backward()
    assert (e.grad[[0, 1], [0, 1]] > 0).all()  # raising a positive's error raises the loss
    assert (e.grad[0, 1:] < 0).all() and (e.grad[1, [0, 2]] < 0).all()
    better = softrepa_loss(torch.tensor([[0.10, 0.25, 0.30], [0.30, 0.10, 0.25]]), pos).loss
    assert better < out.loss


def test_accuracy_counts_rows_whose_positive_has_the_lowest_error():
    e = torch.tensor([[0.1, 0.2], [0.1, 0.3], [0.5, 0.4]])
    assert retrieval_accuracy(e, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert softrepa_loss(e, torch.tensor([0, 1, 1])).accuracy == pytest.approx(2 / 3)


def test_error_matrix_layout_is_prompt_major():
    n_img, n_prm = 2, 3
    target = torch.zeros(n_img, 1, 2, 2)
    # row j * B + i holds image i under prompt j; fill it with the value (10 j + i)
    pred = torch.stack([torch.full((1, 2, 2), float(10 * j + i)) for j in range(n_prm) for i in range(n_img)])
    e = error_matrix(pred, target, n_img, n_prm)
    assert e.shape == (n_img, n_prm)
    assert torch.equal(e, torch.tensor([[float((10 * j + i) ** 2) for j in range(n_prm)] for i in range(n_img)]))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        softrepa_loss(torch.rand(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        softrepa_loss(torch.rand(6), torch.tensor([0]))
    with pytest.raises(ValueError):
        contrastive_logits(torch.rand(2, 2), temperature=0.0)
