"""The student's loss: the true labels plus three things the EMA teacher knows.

- embedding: MSE to the teacher's user embedding, so that cold users land in
  the same space as warm ones;
- attention: KL divergence from the teacher's attention weights over the same
  history, for rows that have one;
- click: binary cross-entropy to the teacher's click (like) probabilities, on
  the rated rows only, as in the label loss (a sampled item was never shown,
  so the teacher's click probability for it is no target);
- interact: binary cross-entropy to the teacher's interaction probabilities,
  on every row;
- ranking: KL divergence from the teacher's distribution over a sampled set of
  catalogue items (a softmax of its ranking scores) to the student's, for a
  sample of rows: which items the teacher would put first, not only how it
  scores the one item of each row.

The click and interaction terms may be limited to some rows (``targeted``):
the trainer can leave out rows whose history the student sees cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.network import Output


# Turns a batch's count of rows into the divisor of a masked mean. One process
# divides by its own count; a sharded run by the mean count over its ranks, so
# that the ranks' averaged gradients are those of the whole global batch.
Count = Callable[[torch.Tensor], torch.Tensor]


def _own(count: torch.Tensor) -> torch.Tensor:
    return count


@dataclass(frozen=True)
class DistillWeights:
    label: float = 1.0
    embedding: float = 1.0
    attention: float = 1.0
    click: float = 1.0
    ranking: float = 0.0  # needs candidates to score: see ``Ranked``
    interact: float = 1.0


@dataclass(frozen=True)
class Ranked:
    """Student and teacher outputs over the same candidates, ``[S, N]`` logits."""

    student: Output
    teacher: Output


def distillation_loss(
    student: Output,
    teacher: Output,
    label: torch.Tensor,
    rated: torch.Tensor,
    weights: DistillWeights = DistillWeights(),
    count: Count = _own,
    ranked: Ranked | None = None,
    targeted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns the weighted total and each term's value.

    Args:
        student: the student's output on a batch.
        teacher: the teacher snapshot's output on the same batch (no grad).
        label: ``[B]`` clicks.
        rated: ``[B]`` 1 for logged interactions, 0 for sampled items.
        count: the divisor of the masked means (see ``Count``).
        ranked: both over sampled candidates, for the ranking term; without
            it the term is left out.
        targeted: ``[B]`` 1 for the rows whose click and interaction
            probabilities the student is to match, 0 for rows that learn from
            the labels alone; every row without it.
    """
    terms = {
        "label": label_loss(student, label, rated, count),
        "embedding": F.mse_loss(student.user_embedding, teacher.user_embedding),
        "attention": _attention_kl(student.attention, teacher.attention, count),
        "click": _click_cross_entropy(
            student, teacher, rated if targeted is None else rated * targeted, count
        ),
        "interact": _interact_cross_entropy(student, teacher, targeted, count),
    }
    if ranked is not None:
        terms["ranking"] = ranking_kl(ranked.student, ranked.teacher, count)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: value.item() for name, value in terms.items()}


def label_loss(
    out: Output, label: torch.Tensor, rated: torch.Tensor, count: Count = _own
) -> torch.Tensor:
    """Loss against the data: interaction head on rated against sampled items,
    click head on the rated items alone (a sampled item was never shown)."""
    interact = F.binary_cross_entropy_with_logits(out.interact_logit, rated)
    like = F.binary_cross_entropy_with_logits(out.logit, label, reduction="none")
    return interact + (like * rated).sum() / count(rated.sum()).clamp(min=1.0)


def _click_cross_entropy(
    student: Output, teacher: Output, rated: torch.Tensor, count: Count = _own
):
    """Cross-entropy to the teacher's click probabilities on the rated rows
    alone, as in :func:`label_loss` (the teacher's click probability of a
    sampled item, never shown, is no target)."""
    like = F.binary_cross_entropy_with_logits(
        student.logit, torch.sigmoid(teacher.logit), reduction="none"
    )
    return (like * rated).sum() / count(rated.sum()).clamp(min=1.0)


def _interact_cross_entropy(
    student: Output, teacher: Output, targeted: torch.Tensor | None, count: Count
):
    """Cross-entropy to the teacher's interaction probabilities: the mean over
    every row, or over the ``targeted`` ones."""
    target = torch.sigmoid(teacher.interact_logit)
    if targeted is None:
        return F.binary_cross_entropy_with_logits(student.interact_logit, target)
    interact = F.binary_cross_entropy_with_logits(
        student.interact_logit, target, reduction="none"
    )
    return (interact * targeted).sum() / count(targeted.sum()).clamp(min=1.0)


def _attention_kl(student: torch.Tensor, teacher: torch.Tensor, count: Count = _own):
    """Mean KL(teacher || student) over rows with history; ``[B, L]`` weights."""
    has_history = teacher.sum(-1) > 0
    rows = count(has_history.sum().to(student.dtype))  # on every rank, even with none
    if not has_history.any():
        return student.sum() * 0.0
    t, s = teacher[has_history], student[has_history]
    eps = 1e-8
    kl = (t * ((t + eps).log() - (s + eps).log())).sum(-1)
    return kl.sum() / rows.clamp(min=1.0)


def ranking_kl(student: Output, teacher: Output, count: Count = _own) -> torch.Tensor:
    """Mean KL(teacher || student) of the softmax of the ranking scores over each
    row's candidates; ``[S, N]`` logits in both outputs."""
    target = torch.log_softmax(teacher.rank_score(), -1)
    log_p = torch.log_softmax(student.rank_score(), -1)
    kl = (target.exp() * (target - log_p)).sum(-1)
    rows = count(torch.tensor(float(len(kl))))
    return kl.sum() / rows.clamp(min=1.0)
