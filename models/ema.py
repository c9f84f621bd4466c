"""Exponential moving average of a model's weights: the teacher.

``shadow = decay * shadow + (1 - decay) * theta`` after each optimizer step, done
with torch's multi-tensor ``lerp_`` over every floating parameter and buffer at
once. The shadow is float32 whatever the model trains in: in bf16,
``1.0 * 0.999`` rounds back to 1.0 and a bf16 shadow would never move.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)


def decay_for_steps(total_steps: int, floor: float = 0.99, ceiling: float = 0.9995) -> float:
    """A decay whose averaging horizon is about 1% of the planned run.

    The EMA's horizon is ``1 / (1 - decay)`` updates. Averaging over the last 1%
    of training smooths step noise without holding on to weights from long
    before; clamped to [0.99, 0.9995], this gives 0.9995 for runs of 200k steps
    and more (the value recommended for 1M-step pre-training) and 0.99 for runs
    under 10k steps. Recommendation runs are short, which is why 0.995 (a
    200-step horizon) is this project's default rather than the derived value.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return min(ceiling, max(floor, 1.0 - 100.0 / total_steps))


class EMA:
    """A float32 shadow of a model's floating parameters and buffers.

    Args:
        model: the online model; its current weights seed the shadow.
        decay: the configured decay in (0, 1); never changed by the schedule.
        warmup: ramp the decay as ``min(decay, (1 + n) / (10 + n))`` so early
            updates do not anchor the shadow to the random initialisation.
        update_every: fold the weights in every N calls of ``step``.

    Integer buffers (counters) are copied, not averaged.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.995,
        warmup: bool = True,
        update_every: int = 1,
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.num_updates = 0
        self.num_calls = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}
        for name, tensor in _named_state(model):
            if tensor.is_floating_point():
                self.shadow[name] = tensor.detach().to(torch.float32, copy=True)
            else:
                self.copied[name] = tensor.detach().clone()

    def current_decay(self) -> float:
        """The decay the next update uses, from the update count."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def step(self, model: nn.Module) -> bool:
        """Counts an optimizer step; updates when due. Returns whether it did."""
        self.num_calls += 1
        if self.num_calls % self.update_every:
            return False
        self.update(model)
        return True

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Folds the model's current weights into the shadow."""
        decay = self.current_decay()
        shadows, sources = [], []
        for name, tensor in self._paired(model):
            if name in self.shadow:
                shadows.append(self.shadow[name])
                sources.append(tensor.detach().to(torch.float32))
            else:
                self.copied[name].copy_(tensor)
        torch._foreach_lerp_(shadows, sources, 1.0 - decay)
        self.num_updates += 1

    def _paired(self, model: nn.Module):
        names = set(self.shadow) | set(self.copied)
        state = dict(_named_state(model))
        if set(state) != names:
            missing, extra = sorted(names - set(state)), sorted(set(state) - names)
            raise KeyError(
                f"model does not match the EMA: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for name in self.shadow.keys() | self.copied.keys():
            yield name, state[name]

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the shadow into a model of the same structure."""
        for name, tensor in self._paired(model):
            source = self.shadow.get(name)
            tensor.copy_(self.copied[name] if source is None else source)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "update_every": self.update_every,
            "num_updates": self.num_updates,
            "num_calls": self.num_calls,
            "shadow": dict(self.shadow),
            "copied": dict(self.copied),
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise KeyError("EMA state does not match this model's tensors")
        for key in ("decay", "warmup", "update_every", "num_updates", "num_calls"):
            setattr(self, key, state[key])
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)
        for name, tensor in state["copied"].items():
            self.copied[name].copy_(tensor)

    @property
    def horizon(self) -> float:
        """Updates over which the average mostly extends, ``1 / (1 - decay)``."""
        return math.inf if self.decay >= 1 else 1.0 / (1.0 - self.decay)


def _named_state(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()
