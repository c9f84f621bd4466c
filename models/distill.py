"""The student's loss: the true labels plus three things the EMA teacher knows.

- embedding: MSE to the teacher's user embedding, so that cold users land in
  the same space as warm ones;
- attention: KL divergence from the teacher's attention weights over the same
  history, for rows that have one;
- click: binary cross-entropy to the teacher's click probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.network import Output


@dataclass(frozen=True)
class DistillWeights:
    label: float = 1.0
    embedding: float = 1.0
    attention: float = 1.0
    click: float = 1.0


def distillation_loss(
    student: Output,
    teacher: Output,
    label: torch.Tensor,
    weights: DistillWeights = DistillWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns the weighted total and each term's value.

    Args:
        student: the student's output on a batch.
        teacher: the teacher snapshot's output on the same batch (no grad).
        label: ``[B]`` clicks.
    """
    terms = {
        "label": F.binary_cross_entropy_with_logits(student.logit, label),
        "embedding": F.mse_loss(student.user_embedding, teacher.user_embedding),
        "attention": _attention_kl(student.attention, teacher.attention),
        "click": F.binary_cross_entropy_with_logits(
            student.logit, torch.sigmoid(teacher.logit)
        ),
    }
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: value.item() for name, value in terms.items()}


def _attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over rows with history; ``[B, L]`` weights."""
    has_history = teacher.sum(-1) > 0
    if not has_history.any():
        return student.sum() * 0.0
    t, s = teacher[has_history], student[has_history]
    eps = 1e-8
    kl = (t * ((t + eps).log() - (s + eps).log())).sum(-1)
    return kl.mean()
