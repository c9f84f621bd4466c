"""The student's loss: the true labels plus three things the EMA teacher knows.

- embedding: MSE to the teacher's user embedding, so that cold users land in
  the same space as warm ones;
- attention: KL divergence from the teacher's attention weights over the same
  history, for rows that have one;
- click: binary cross-entropy to the teacher's probabilities, both the click
  (like) head and the interaction head.
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
    rated: torch.Tensor,
    weights: DistillWeights = DistillWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns the weighted total and each term's value.

    Args:
        student: the student's output on a batch.
        teacher: the teacher snapshot's output on the same batch (no grad).
        label: ``[B]`` clicks.
        rated: ``[B]`` 1 for logged interactions, 0 for sampled items.
    """
    terms = {
        "label": label_loss(student, label, rated),
        "embedding": F.mse_loss(student.user_embedding, teacher.user_embedding),
        "attention": _attention_kl(student.attention, teacher.attention),
        "click": F.binary_cross_entropy_with_logits(
            student.logit, torch.sigmoid(teacher.logit)
        )
        + F.binary_cross_entropy_with_logits(
            student.interact_logit, torch.sigmoid(teacher.interact_logit)
        ),
    }
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: value.item() for name, value in terms.items()}


def label_loss(out: Output, label: torch.Tensor, rated: torch.Tensor) -> torch.Tensor:
    """Loss against the data: interaction head on rated against sampled items,
    click head on the rated items alone (a sampled item was never shown)."""
    interact = F.binary_cross_entropy_with_logits(out.interact_logit, rated)
    like = F.binary_cross_entropy_with_logits(out.logit, label, reduction="none")
    return interact + (like * rated).sum() / rated.sum().clamp(min=1.0)


def _attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over rows with history; ``[B, L]`` weights."""
    has_history = teacher.sum(-1) > 0
    if not has_history.any():
        return student.sum() * 0.0
    t, s = teacher[has_history], student[has_history]
    eps = 1e-8
    kl = (t * ((t + eps).log() - (s + eps).log())).sum(-1)
    return kl.mean()
