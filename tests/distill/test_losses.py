"""Each TinyBERT loss is zero for identical teacher and student outputs and positive otherwise."""

import pytest
import torch
from torch import nn

from distill.losses import LOSSES, attention_mse, hidden_mse, masked_mse, prediction_kl


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g)
    return a, a + 0.1 * torch.randn(*shape, generator=g)


def test_hidden_mse_zero_when_equal_positive_otherwise():
    teacher, student = _pair((2, 5, 8))
    mask = torch.ones(2, 5, dtype=torch.long)
    assert hidden_mse(teacher.clone(), teacher, mask) == 0
    assert hidden_mse(student, teacher, mask) > 0


def test_hidden_mse_ignores_padding():
    teacher, student = _pair((2, 5, 8))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mixed = teacher.clone()
    mixed[0, 3:] = 1000.0  # garbage at padded positions must not count
    assert hidden_mse(mixed, teacher, mask) == 0
    assert hidden_mse(mixed, teacher, None) > 0


def test_attention_mse_compares_only_usable_pairs():
    teacher, student = _pair((2, 4, 6, 6))
    usable = torch.tril(torch.ones(1, 1, 6, 6, dtype=torch.bool))
    assert attention_mse(teacher.clone(), teacher, usable) == 0
    assert attention_mse(student, teacher, usable) > 0
    future = teacher.clone()
    future[..., 0, 1:] = -1e9  # masked-out (future) keys differ: not compared
    assert attention_mse(future, teacher, usable) == 0
    with pytest.raises(ValueError):
        attention_mse(teacher[:, :2], teacher, usable)


def test_prediction_kl_zero_when_equal_positive_otherwise():
    teacher, student = _pair((4, 3))
    for t in (1.0, 2.0):
        assert prediction_kl(teacher.clone(), teacher, t).abs() < 1e-7
        assert prediction_kl(student, teacher, t) > 0
    # Shifting all logits by a constant leaves the distribution, hence the loss, unchanged.
    assert prediction_kl(teacher + 5.0, teacher).abs() < 1e-6


def test_prediction_kl_equals_soft_cross_entropy_minus_teacher_entropy():
    teacher, student = _pair((4, 7), seed=3)
    p = torch.softmax(teacher, -1)
    soft_ce = -(p * torch.log_softmax(student, -1)).sum(-1).mean()
    entropy = -(p * torch.log_softmax(teacher, -1)).sum(-1).mean()
    assert torch.allclose(prediction_kl(student, teacher), soft_ce - entropy, atol=1e-6)


def test_projection_is_learned_when_widths_differ():
    g = torch.Generator().manual_seed(0)
    true_map = torch.randn(8, 4, generator=g)
    student = torch.randn(64, 4, generator=g)
    teacher = student @ true_map.T
    projection = nn.Linear(4, 8, bias=False)
    before = hidden_mse(student[None], teacher[None], None, projection).item()
    optimizer = torch.optim.Adam(projection.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        hidden_mse(student[None], teacher[None], None, projection).backward()
        optimizer.step()
    after = hidden_mse(student[None], teacher[None], None, projection).item()
    assert after < 0.01 * before
    assert torch.allclose(projection.weight, true_map, atol=0.05)


def test_loss_registry_names():
    assert set(LOSSES) == {"embedding", "hidden", "attention", "prediction"}
    assert masked_mse(torch.ones(3), torch.zeros(3), torch.tensor([True, False, False])) == 1


def test_normalized_hidden_mse_is_scale_free_and_zero_only_for_equal_directions():
    teacher, student = _pair((2, 5, 8))
    assert hidden_mse(teacher * 1000.0, teacher, None, normalize=True) < 1e-10
    assert hidden_mse(student, teacher, None, normalize=True) > 0
    big = teacher.clone()
    big[0, 0] *= 1e4  # one outsized token dominates the plain MSE, not the normalised one
    assert hidden_mse(big, teacher, None) > 1e3 * hidden_mse(big, teacher, None, normalize=True)
