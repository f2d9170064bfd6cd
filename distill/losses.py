"""The TinyBERT losses as pure functions of captured tensors (Jiao et al. 2020, eq. 7-11).

Every loss is zero when the student reproduces the teacher and positive otherwise. For the
prediction layer that means KL(p_teacher || p_student) at temperature T: TinyBERT's soft
cross-entropy minus the teacher's entropy, which is constant in the student, so the gradients
are the same and the figure reads as a distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LossSpec:
    name: str
    needs: str
    """What must be captured: 'embedding', 'hidden', 'attention' or 'logits'."""
    description: str


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in [
    LossSpec("embedding", "embedding", "MSE between embedding-layer outputs (through W_e when widths differ)"),
    LossSpec("hidden", "hidden", "MSE between the outputs of student layer m and teacher layer g(m) (through W_h)"),
    LossSpec("attention", "attention", "MSE between pre-softmax attention scores of mapped layers, per head"),
    LossSpec("prediction", "logits", "KL(teacher || student) of the output distributions at temperature T"),
]}


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the positions where ``valid`` (broadcast to the inputs) is true."""
    diff = (student.float() - teacher.float()).pow(2)
    if valid is None:
        return diff.mean()
    valid = valid.expand_as(diff)
    return diff[valid].mean()


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token vector divided by its root mean square."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor | None,
               projection: nn.Module | None = None, normalize: bool = False) -> torch.Tensor:
    """Hidden states [batch, tokens, width]: MSE(student W, teacher) over real (unpadded) tokens.

    ``normalize`` compares RMS-normalised vectors: in pre-norm decoders a few tokens carry residual
    activations thousands of times larger than the rest, and raw MSE would spend the whole loss on
    them, while the next norm layer only ever sees each vector's direction and relative size.
    """
    if projection is not None:
        student = projection(student)
    if normalize:
        student, teacher = rms_normalize(student), rms_normalize(teacher)
    valid = None if token_mask is None else token_mask.bool()[..., None]
    return masked_mse(student, teacher, valid)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores [batch, heads, queries, keys]; ``valid`` marks the (query, key) pairs that
    attention can use (masked-out keys carry a huge negative bias that must not be compared)."""
    if student.shape != teacher.shape:
        raise ValueError(f"attention scores differ in shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    return masked_mse(student, teacher, valid)


def prediction_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(z_t / T) || softmax(z_s / T)), averaged over examples (or real tokens for LMs)."""
    log_p_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    if token_mask is None:
        return per_position.mean()
    return per_position[token_mask.bool()].mean()
