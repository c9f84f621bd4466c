"""Exponential moving average of a model's weights: the teacher.

``shadow = decay * shadow + (1 - decay) * theta`` after each optimizer step, done
with torch's multi-tensor ``lerp_`` over every floating parameter and buffer at
once (on CPU, small tensors in groups on every core: see ``multi_tensor``).
The shadow is float32 whatever the model trains in: in bf16, ``1.0 * 0.999``
rounds back to 1.0 and a bf16 shadow would never move.

Embedding tables can be averaged lazily and still exactly. When the optimizer
leaves rows without gradient unchanged, a row that last caught up at update
``m`` and kept the value ``theta`` since then is, at update ``n``,
``D * shadow + (1 - D) * theta`` with ``D`` the product of the decays of
updates ``m + 1 .. n``. The EMA keeps, per table row, the update it last caught
up at, and a running sum of log-decays, so ``D = exp(sum[n] - sum[m])``.
A row has to catch up *before* the optimizer changes it, while it still holds
the value it had at every update since ``m``: :meth:`EMA.prepare` does that for
the rows a step is about to change, and is called automatically from a step
pre-hook when the optimizer is given. Every other row is caught up on
:meth:`EMA.sync_all`, which every read of the average (``shadow``,
``state_dict``, ``copy_to``) runs first.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from models import lazy_rows
from models.multi_tensor import Packed, SplitLerp, packable

logger = logging.getLogger(__name__)

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]

# TorchRec's EmbeddingBagCollection names its tables ``embedding_bags.<t>.weight``.
TABLE_MARK = "embedding_bags."
# Relative movements are divided by a norm; an all-zero tensor must not blow up.
_TINY = 1e-12


def decay_for_steps(
    total_steps: int, floor: float = 0.99, ceiling: float = 0.9995
) -> float:
    """A decay whose averaging horizon is about 1% of the planned run.

    The EMA's horizon is ``1 / (1 - decay)`` updates. Averaging over the last 1%
    of training smooths step noise without holding on to weights from long
    before; clamped to [0.99, 0.9995], this gives 0.9995 for runs of 200k steps
    and more (the value recommended for 1M-step pre-training) and 0.99 for runs
    under 10k steps. Recommendation runs are short, which is why 0.995 (a
    200-step horizon) is this project's default rather than the derived value.

    Args:
        total_steps: planned number of EMA updates.
        floor: the lowest decay returned.
        ceiling: the highest decay returned.

    Returns:
        The decay, in ``[floor, ceiling]``.

    Raises:
        ValueError: if ``total_steps`` is not positive.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return min(ceiling, max(floor, 1.0 - 100.0 / total_steps))


def is_table_name(name: str) -> bool:
    """Whether ``name`` is a TorchRec ``EmbeddingBagCollection`` table weight."""
    return TABLE_MARK in name and name.endswith(".weight")


class _LogPrefix:
    """Running sums of log-decays, one per update since ``base``.

    The sums at ``n`` and ``m`` differ by the log of the product of the decays
    of updates ``m + 1 .. n``. Float64 keeps the sum exact far beyond float32
    precision.
    """

    def __init__(self, base: int) -> None:
        self.reset(base)

    def reset(self, base: int) -> None:
        """Starts over at update ``base``, with an empty product."""
        self.base = base
        self.total = 0.0
        self._values = torch.zeros(64, dtype=torch.float64)
        self._length = 1
        self._weights: torch.Tensor | None = None

    def append(self, decay: float) -> None:
        """Records the decay of the next update."""
        if self._length == len(self._values):
            grown = torch.zeros(2 * self._length, dtype=torch.float64)
            grown[: self._length] = self._values
            self._values = grown
        self.total += math.log(decay)
        self._values[self._length] = self.total
        self._length += 1

    def catch_up_weights(self, last: torch.Tensor) -> torch.Tensor:
        """Lerp weights ``1 - D`` of rows last caught up at update ``last``.

        ``D`` is the product of the decays of updates ``last + 1 .. now``. The
        weights are tabulated per update count (a few entries), then gathered:
        two passes over the rows instead of six.

        Args:
            last: ``[R]`` update counts, at least ``base``.

        Returns:
            ``[R]`` float32 weights.
        """
        weights = self.weights().to(last.device)  # [L]
        return weights.index_select(0, last - self.base)

    def weights(self) -> torch.Tensor:
        """``[L]`` float32 lerp weights of rows last caught up at ``base + i``."""
        if self._weights is None or len(self._weights) != self._length:
            sums = self._values[: self._length]  # [L]
            self._weights = (1.0 - torch.exp(self.total - sums)).to(torch.float32)
        return self._weights


class _LazyTable:
    """Per-row catch-up state of one lazily averaged table."""

    def __init__(self, source: torch.Tensor, num_updates: int) -> None:
        self.source = source
        # [rows] the update count each row's shadow is exact through.
        self.last = torch.full(
            (source.shape[0],), num_updates, dtype=torch.int64, device=source.device
        )
        self.stale = False
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def scratch(self, rows: int, shadow: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Two ``[rows, D]`` float32 work buffers, reused across steps.

        A fresh buffer of this size per step is a fresh mapping from the
        kernel, and faulting its pages in costs about as much as the gathers.
        """
        if self._scratch is None or len(self._scratch[0]) < rows:
            shape = (max(rows, 1), *shadow.shape[1:])
            self._scratch = tuple(
                torch.empty(shape, dtype=torch.float32, device=shadow.device)
                for _ in range(2)
            )
        return tuple(buffer[:rows] for buffer in self._scratch)


_DTYPE = operator.attrgetter("dtype")
_NOT_NONE = functools.partial(operator.is_not, None)


class _Layout:
    """What decides a plain module tree's named tensors, cheap to compare.

    For modules that do not override ``named_parameters``/``named_buffers``,
    the named tensors follow from each module's ``_parameters``, ``_buffers``
    and ``_modules`` (keys and objects) and the tensors' dtypes (``.half()``
    changes a parameter's dtype in place). Comparing those takes C-speed
    passes; walking ``named_parameters()`` builds every name in Python, which
    costs more than the update itself on a model of many small tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())  # holds the model: its id stays
        self.plain = all(
            type(m).named_parameters is nn.Module.named_parameters
            and type(m).named_buffers is nn.Module.named_buffers
            for m in self.modules
        )
        self._seen = self._take() if self.plain else None

    def _take(self) -> tuple[list, list, list]:
        keys: list[tuple] = []
        objects: list = []
        tensors: list = []
        for module in self.modules:
            for members in (module._parameters, module._buffers):
                keys.append(tuple(members))
                tensors.extend(members.values())
            keys.append(tuple(module._modules))
            objects.extend(module._modules.values())
        objects.extend(tensors)
        # map/filter with C callables: a comprehension over thousands of
        # tensors costs a good part of a packed update.
        dtypes = list(map(_DTYPE, filter(_NOT_NONE, tensors)))
        return keys, objects, dtypes

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` is this model with the same named tensors."""
        if not self.plain or model is not self.modules[0]:
            return False
        keys, objects, dtypes = self._take()
        seen_keys, seen_objects, seen_dtypes = self._seen
        return (
            keys == seen_keys
            and len(objects) == len(seen_objects)
            and all(map(operator.is_, objects, seen_objects))
            and dtypes == seen_dtypes
        )


@dataclass
class _Plan:
    """How one model's tensors pair with the EMA's, for the update loop."""

    key: list
    names: list[str] = field(default_factory=list)
    shadows: list[torch.Tensor] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    cast: bool = False
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    tables: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    lerp: SplitLerp | None = None
    layout: _Layout | None = None

    def add_average(self, name: str, shadow: torch.Tensor, tensor: torch.Tensor):
        self.names.append(name)
        self.shadows.append(shadow)
        self.tensors.append(tensor)
        self.cast |= tensor.dtype != torch.float32

    def sources(self) -> list[torch.Tensor]:
        """The model's tensors as float32 (cast copies only where needed)."""
        if not self.cast:
            return self.tensors
        return [t.detach().to(torch.float32) for t in self.tensors]


class EMA:
    """A float32 shadow of a model's floating parameters and buffers.

    Args:
        model: the online model; its current weights seed the shadow.
        decay: the configured decay in (0, 1); never changed, neither by the
            schedule nor by :meth:`set_active_decay`.
        warmup: ramp the decay as ``min(active, (1 + n) / (10 + n))`` so early
            updates do not anchor the shadow to the random initialisation.
        update_every: fold the weights in every N calls of ``step``.
        lazy_tables: average embedding tables row by row, exactly (see the
            module docstring): ``True`` for every TorchRec table
            (``embedding_bags.*.weight``), or a list of 2-D tensor names.
        optimizer: the optimizer (or optimizers) stepping the model. With lazy
            tables it is checked for row exactness, a table it would move
            inexactly stays dense (with a warning), and a step pre-hook calls
            :meth:`prepare` with the rows that have a gradient.
        adaptive: give each dense tensor its own decay from how much it moves;
            see :meth:`tensor_decays`.
        adaptive_floor: the lowest adaptive decay (capped by the schedule).
        adaptive_scale: the relative movement at which a tensor's decay is
            halfway between the schedule's decay and the floor.
        adaptive_rate: decay of the running average of relative movement.
        write_barrier: called before every write to the shadow; a publisher
            reading the shadow in the background (``DoubleBuffer.wait``) goes
            here so it never reads a half-written average.
        contiguous: pack the model's small floating tensors (below 32,768
            elements, lazy tables aside) into one flat buffer per dtype and
            device, and their shadows likewise, so an update is one ``lerp_``
            per buffer instead of one per tensor (see ``multi_tensor.Packed``).
            The model's tensors keep their objects and values; one given new
            storage later (``.to()``, ``.data = ...``) is noticed at the next
            update and averaged on its own from then on, with a warning.

    Integer buffers (counters) are copied, not averaged.

    Raises:
        ValueError: for a decay outside (0, 1), ``update_every < 1``, a
            lazy table that is not a 2-D floating tensor of the model, or
            ``contiguous`` with ``adaptive`` (one decay per packed buffer).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.995,
        warmup: bool = True,
        update_every: int = 1,
        *,
        lazy_tables: bool | Sequence[str] = False,
        optimizer: Optimizers | None = None,
        adaptive: bool = False,
        adaptive_floor: float = 0.99,
        adaptive_scale: float = 0.01,
        adaptive_rate: float = 0.9,
        write_barrier: Callable[[], None] | None = None,
        contiguous: bool = False,
    ):
        _check_decay(decay)
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        if contiguous and adaptive:
            raise ValueError(
                "contiguous=True averages a packed buffer with one decay; "
                "adaptive=True needs one per tensor: set only one of them"
            )
        self.decay = decay
        self.active_decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.num_updates = 0
        self.num_calls = 0
        self.adaptive = adaptive
        self.adaptive_floor = adaptive_floor
        self.adaptive_scale = adaptive_scale
        self.adaptive_rate = adaptive_rate
        self.write_barrier = write_barrier
        self._shadow: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}
        for name, tensor in named_state(model):
            if tensor.is_floating_point():
                self._shadow[name] = tensor.detach().to(torch.float32, copy=True)
            else:
                self.copied[name] = tensor.detach().clone()
        self.movement: dict[str, float] = {}
        self._raw: dict[str, torch.Tensor] | None = None
        self._prefix = _LogPrefix(0)
        self._tables: dict[str, _LazyTable] = {}
        self._hooks: list = []
        self._plan: _Plan | None = None
        optimizers = _as_list(optimizer)
        requested = self._requested_tables(model, lazy_tables)
        self._setup_lazy(model, requested, optimizers)
        self._packs: list[Packed] = []
        if contiguous:
            self._pack(model)

    # -- configuration ---------------------------------------------------------

    @property
    def configured_decay(self) -> float:
        """The decay given at construction; no schedule or guard changes it."""
        return self.decay

    def set_active_decay(self, decay: float) -> None:
        """Sets the cap the schedule uses from the next update on.

        Args:
            decay: the new active decay, in (0, configured decay].

        Raises:
            ValueError: if ``decay`` is outside (0, configured decay].
        """
        _check_decay(decay)
        if decay > self.decay:
            raise ValueError(
                f"active decay {decay} exceeds the configured decay {self.decay}"
            )
        logger.info("EMA active decay %.6g -> %.6g", self.active_decay, decay)
        self.active_decay = decay

    def current_decay(self) -> float:
        """The decay the next update uses, from the update count."""
        if not self.warmup:
            return self.active_decay
        n = self.num_updates
        return min(self.active_decay, (1.0 + n) / (10.0 + n))

    @property
    def lazy_tables(self) -> list[str]:
        """Names of the tables averaged row by row."""
        return list(self._tables)

    @property
    def horizon(self) -> float:
        """Updates the average mostly extends over: ``1 / (1 - active decay)``."""
        return 1.0 / (1.0 - self.active_decay)

    # -- updates ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, model: nn.Module) -> bool:
        """Counts an optimizer step and updates when one is due.

        Args:
            model: the online model, just stepped.

        Returns:
            Whether this call updated the shadow.
        """
        self.num_calls += 1
        if self.num_calls % self.update_every:
            return False
        self.update(model)
        return True

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Folds the model's current weights into the shadow.

        Lazy tables only record the update's decay here; their rows catch up
        in :meth:`prepare` and :meth:`sync_all`.

        Args:
            model: the online model, of the structure the EMA was built from.

        Raises:
            KeyError: if the model's tensors do not match the EMA's.
            RuntimeError: while the EMA weights are swapped into a model.
        """
        self._refuse_while_swapped("update")
        decay = self.current_decay()
        for pack in [p for p in self._packs if not p.intact()]:
            self._unpack(pack, "was given new storage")
            self._plan = None
        plan = self._plan_for(model)
        self._barrier()
        for copy, tensor in plan.copies:
            copy.copy_(tensor)
        for name, tensor in plan.tables:
            self._tables[name].source = tensor
        if plan.shadows:
            sources = plan.sources()
            weight = 1.0 - decay
            if self.adaptive:
                decays = self._adaptive_decays(plan.names, plan.shadows, sources, decay)
                weight = [1.0 - d for d in decays]
            plan.lerp(sources, weight)
        if self._tables:
            self._prefix.append(decay)
            for table in self._tables.values():
                table.stale = True
        self.num_updates += 1

    def _plan_for(self, model: nn.Module) -> _Plan:
        """The pairing of the model's tensors with the EMA's, cached.

        Rebuilt when the model's tensors (names, objects or dtypes) change.
        The cache holds the tensors it names, so their ids stay unique.
        """
        if self._plan is not None and self._plan.layout.matches(model):
            return self._plan
        state = list(named_state(model))
        key = [(name, id(tensor), tensor.dtype) for name, tensor in state]
        if self._plan is not None and self._plan.key == key:
            return self._plan
        self._plan = _Plan(key)
        paired = dict(self._paired(model))
        for pack in [p for p in self._packs if not p.holds(paired)]:
            self._unpack(pack, "is not in this model")
        packed = {name for pack in self._packs for name in pack.names}
        for name, tensor in paired.items():
            if name in packed:
                continue
            if name in self._tables:
                self._plan.tables.append((name, tensor))
            elif name in self._shadow:
                self._plan.add_average(name, self._shadow[name], tensor)
            else:
                self._plan.copies.append((self.copied[name], tensor))
        for pack in self._packs:
            self._plan.add_average(pack.names[0], pack.shadow, pack.source)
        self._plan.lerp = SplitLerp(self._plan.shadows)
        self._plan.layout = _Layout(model)
        return self._plan

    def _paired(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        names = self._shadow.keys() | self.copied.keys()
        state = dict(named_state(model))
        if state.keys() != names:
            missing = sorted(names - state.keys())
            extra = sorted(state.keys() - names)
            raise KeyError(
                f"model does not match the EMA: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for name, tensor in state.items():
            yield name, tensor

    # -- packed small tensors ----------------------------------------------------

    def _pack(self, model: nn.Module) -> None:
        groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in named_state(model):
            if name in self._shadow and name not in self._tables and packable(tensor):
                groups.setdefault((tensor.dtype, tensor.device), []).append(
                    (name, tensor)
                )
        for members in groups.values():
            if len(members) < 2:
                continue
            names = [name for name, _ in members]
            tensors = [tensor for _, tensor in members]
            pack = Packed(names, tensors, [self._shadow[n] for n in names])
            self._shadow.update(zip(names, pack.shadows, strict=True))
            self._packs.append(pack)
            logger.info(
                "EMA packed %d %s tensors (%d elements) into one buffer",
                len(names),
                pack.source.dtype,
                pack.numel,
            )
        self._plan = None

    def _unpack(self, pack: Packed, why: str) -> None:
        logger.warning(
            "EMA: a packed tensor (of %s, ...) %s; its %d tensors are averaged "
            "one by one from now on",
            pack.names[0],
            why,
            len(pack.names),
        )
        self._packs.remove(pack)

    # -- lazy tables -----------------------------------------------------------

    @torch.no_grad()
    def prepare(self, touched: Mapping[str, torch.Tensor]) -> None:
        """Brings rows up to date before the optimizer changes them.

        Call it after ``backward()`` and before ``optimizer.step()`` (before
        ``backward()`` for optimizers fused into the backward pass) with every
        row the step may change; duplicates and rows already up to date are
        harmless. A step pre-hook does this when the EMA was given the
        optimizer. Tables that are not lazy (dense fallback) are ignored.

        Args:
            touched: table name to row ids, ``LongTensor [R]``.

        Raises:
            KeyError: for a name that is no tensor of the EMA.
            RuntimeError: while the EMA weights are swapped into a model.
        """
        self._refuse_while_swapped("prepare")
        for name, rows in touched.items():
            if name not in self._tables:
                if name not in self._shadow:
                    raise KeyError(f"{name!r} is not a tensor of the EMA")
                continue
            if rows.numel():
                self._sync_rows(name, rows.reshape(-1).to(torch.int64))

    def _sync_rows(self, name: str, rows: torch.Tensor) -> None:
        table = self._tables[name]
        shadow = self._shadow[name]  # [N, D]
        source = table.source.detach()
        if lazy_rows.fused(shadow, source) and rows.device.type == "cpu":
            self._barrier()
            weights, base = self._prefix.weights(), self._prefix.base
            lazy_rows.catch_up_rows(
                shadow, source, table.last, weights, base, rows, self.num_updates
            )
            return

        # Duplicates stay; they write the same value twice. Sorting the ids
        # first saves less in gathers than the sort costs.
        last = table.last.index_select(0, rows)  # [R]
        weight = self._prefix.catch_up_weights(last).unsqueeze(1)  # [R, 1]
        caught_up, theta = table.scratch(len(rows), shadow)  # [R, D] each
        torch.index_select(shadow, 0, rows, out=caught_up)
        if source.dtype == torch.float32:
            torch.index_select(source, 0, rows, out=theta)
        else:
            theta.copy_(source.index_select(0, rows))
        caught_up.lerp_(theta, weight)
        self._barrier()
        shadow.index_copy_(0, rows, caught_up)
        table.last.index_fill_(0, rows, self.num_updates)

    @torch.no_grad()
    def sync_all(self) -> None:
        """Brings every row of every lazy table up to date.

        Exact because rows that did not catch up in :meth:`prepare` have not
        changed since they last did. Costs one dense pass over each stale table.
        """
        if not any(table.stale for table in self._tables.values()):
            return
        self._barrier()
        for name, table in self._tables.items():
            if table.stale:
                self._sync_table(self._shadow[name], table)
        self._prefix.reset(self.num_updates)

    def _sync_table(self, shadow: torch.Tensor, table: _LazyTable) -> None:
        weight = self._prefix.catch_up_weights(table.last).unsqueeze(1)  # [N, 1]
        shadow.lerp_(table.source.detach().to(torch.float32), weight)
        table.last.fill_(self.num_updates)
        table.stale = False

    def synced_shadow(self) -> dict[str, torch.Tensor]:
        """The shadow, every lazy row brought up to date first.

        Returns:
            Tensor name to float32 shadow; the EMA's own tensors, not copies.
        """
        self.sync_all()
        return self._shadow

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The up-to-date shadow; the same as :meth:`synced_shadow`."""
        return self.synced_shadow()

    def _requested_tables(
        self, model: nn.Module, lazy_tables: bool | Sequence[str]
    ) -> list[str]:
        if lazy_tables is True:
            return [n for n, _ in model.named_parameters() if is_table_name(n)]
        if not lazy_tables:
            return []
        for name in lazy_tables:
            tensor = self._shadow.get(name)
            if tensor is None or tensor.dim() != 2:
                raise ValueError(f"lazy table {name!r} is no 2-D float tensor")
        return list(lazy_tables)

    def _setup_lazy(self, model, names: list[str], optimizers: list) -> None:
        state = dict(named_state(model))
        dense: dict[str, list[str]] = {}
        for name in names:
            reason = _inexact_reason(optimizers, state[name]) if optimizers else None
            if reason is None:
                self._tables[name] = _LazyTable(state[name], self.num_updates)
            else:
                dense.setdefault(reason, []).append(name)
        for reason, tables in dense.items():
            logger.warning(
                "EMA tables %s stay dense: their optimizer is not row-exact (%s)",
                tables,
                reason,
            )
        if self._tables and not optimizers:
            logger.info(
                "EMA lazy tables %s without an optimizer: call prepare() "
                "before each step",
                self.lazy_tables,
            )
        for optimizer in optimizers:
            self._attach(optimizer)

    def _attach(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for group in _param_groups(optimizer) for p in group["params"]}
        names = [n for n, t in self._tables.items() if id(t.source) in held]
        if not names:
            return

        def before_step(*_) -> None:
            self.prepare(_grad_rows({n: self._tables[n].source for n in names}))

        self._hooks.append(optimizer.register_step_pre_hook(before_step))
        logger.info("EMA prepares lazy tables %s before each optimizer step", names)

    def detach_optimizer(self) -> None:
        """Removes the step pre-hooks this EMA put on its optimizers."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # -- adaptive decay --------------------------------------------------------

    def _adaptive_decays(self, names, shadows, sources, decay: float) -> list[float]:
        """Per-tensor decays after folding this update's movement in."""
        gaps = torch.stack(torch._foreach_norm(torch._foreach_sub(sources, shadows)))
        sizes = torch.stack(torch._foreach_norm(shadows)).clamp_min(_TINY)
        moved = (gaps.double() / sizes.double()).tolist()  # [T] relative movement
        rate = self.adaptive_rate
        for name, now in zip(names, moved, strict=True):
            previous = self.movement.get(name, 0.0)
            self.movement[name] = rate * previous + (1 - rate) * now
        return [self._decay_for(self.movement[name], decay) for name in names]

    def _decay_for(self, movement: float, decay: float) -> float:
        floor = min(self.adaptive_floor, decay)
        return decay - (decay - floor) * movement / (movement + self.adaptive_scale)

    def tensor_decays(self) -> dict[str, float]:
        """The decay each averaged tensor gets at the next update.

        Without ``adaptive`` every tensor gets :meth:`current_decay`. With it,
        a dense tensor whose running relative movement ``m`` (an average of
        ``||theta - shadow|| / ||shadow||`` at each update) is large follows
        its weights more closely:
        ``d - (d - floor) * m / (m + scale)`` with ``d`` the schedule's decay
        and ``floor = min(adaptive_floor, d)``. A tensor that never moves
        (``m = 0``) gets exactly ``d``; one moving by ``scale`` gets halfway to
        the floor. Lazy tables always follow the schedule: their movement is
        not measured, as that would read every row.

        Returns:
            Tensor name to decay.
        """
        decay = self.current_decay()
        decays = {name: decay for name in self._shadow}
        if self.adaptive:
            for name in self._shadow.keys() - self._tables.keys():
                decays[name] = self._decay_for(self.movement.get(name, 0.0), decay)
        return decays

    # -- evaluation and checkpoints ---------------------------------------------

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the up-to-date shadow into a model of the same structure.

        Args:
            model: a module of the EMA's structure.

        Raises:
            KeyError: if the model's tensors do not match the EMA's.
        """
        shadow = self.synced_shadow()
        for name, tensor in self._paired(model):
            tensor.copy_(self.copied[name] if name not in shadow else shadow[name])

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluates with the EMA weights: swaps them in, restores the raw after.

        Inside the block :meth:`raw_state_dict` and :meth:`checkpoint` still
        return the raw (trained) weights, and updates are refused.

        Args:
            model: the online model.

        Yields:
            ``model``, holding the EMA weights.

        Raises:
            RuntimeError: if the EMA is already swapped into a model.
        """
        self._refuse_while_swapped("swap")
        raw = {name: t.detach().clone() for name, t in self._paired(model)}
        self.copy_to(model)
        self._raw = raw
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in self._paired(model):
                    tensor.copy_(raw[name])
            self._raw = None
            logger.debug("restored the raw weights after an EMA swap")

    @property
    def is_swapped(self) -> bool:
        """Whether the EMA weights are swapped into a model right now."""
        return self._raw is not None

    def raw_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the raw weights, even while swapped.

        Args:
            model: the online model.

        Returns:
            The model's state dict; while swapped, the raw tensors replace the
            swapped-in EMA weights.
        """
        state = model.state_dict()
        if self._raw is not None:
            for name in state.keys() & self._raw.keys():
                state[name] = self._raw[name]
        return state

    def checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> dict:
        """Everything to resume training: raw model, optimizer and EMA state.

        Args:
            model: the online model.
            optimizer: its optimizer, if its state should be saved too.

        Returns:
            ``{"model": ..., "optimizer": ..., "ema": ...}``; ``"optimizer"`` is
            absent without an optimizer.
        """
        saved = {"model": self.raw_state_dict(model), "ema": self.state_dict()}
        if optimizer is not None:
            saved["optimizer"] = optimizer.state_dict()
        return saved

    def state_dict(self) -> dict:
        """The up-to-date shadow, counts and every hyper-parameter.

        Returns:
            A dict of tensors, numbers and flags (``torch.load`` with
            ``weights_only=True`` reads it back).
        """
        shadow = self.synced_shadow()
        return {
            "decay": self.decay,
            "active_decay": self.active_decay,
            "warmup": self.warmup,
            "update_every": self.update_every,
            "num_updates": self.num_updates,
            "num_calls": self.num_calls,
            "adaptive": self.adaptive,
            "adaptive_floor": self.adaptive_floor,
            "adaptive_scale": self.adaptive_scale,
            "adaptive_rate": self.adaptive_rate,
            "movement": dict(self.movement),
            "shadow": dict(shadow),
            "copied": dict(self.copied),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`, lazy rows included.

        Which tables are lazy stays this EMA's choice: it is how the average is
        computed, not part of it.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            KeyError: if the state is for other tensors.
        """
        if set(state["shadow"]) != set(self._shadow):
            raise KeyError("EMA state does not match this model's tensors")
        for key in ("decay", "warmup", "update_every", "num_updates", "num_calls"):
            setattr(self, key, state[key])
        self.active_decay = state.get("active_decay", state["decay"])
        self.adaptive = state.get("adaptive", False)
        for key in ("adaptive_floor", "adaptive_scale", "adaptive_rate"):
            setattr(self, key, state.get(key, getattr(self, key)))
        self.movement = dict(state.get("movement", {}))
        self.load_shadow({**state["shadow"], **state["copied"]})

    @torch.no_grad()
    def load_shadow(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Overwrites the average (a rollback); counts and schedule stay.

        Args:
            tensors: name to tensor, for every averaged tensor and optionally
                the copied integer buffers.

        Raises:
            KeyError: if an averaged tensor is missing or a name is unknown.
        """
        missing = self._shadow.keys() - tensors.keys()
        unknown = tensors.keys() - self._shadow.keys() - self.copied.keys()
        if missing or unknown:
            raise KeyError(
                f"shadow does not match the EMA: missing {sorted(missing)[:5]}, "
                f"unknown {sorted(unknown)[:5]}"
            )
        self._barrier()
        for name, tensor in tensors.items():
            (self._shadow.get(name, self.copied.get(name))).copy_(tensor)
        for table in self._tables.values():
            table.last.fill_(self.num_updates)
            table.stale = False
        self._prefix.reset(self.num_updates)

    # -- helpers ---------------------------------------------------------------

    def _barrier(self) -> None:
        if self.write_barrier is not None:
            self.write_barrier()

    def _refuse_while_swapped(self, what: str) -> None:
        if self._raw is not None:
            raise RuntimeError(
                f"cannot {what} while the EMA weights are swapped into the model"
            )


def _check_decay(decay: float) -> None:
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")


def named_state(model: nn.Module):
    """A module's parameters then buffers, by name: what the EMA pairs."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def _as_list(optimizer) -> list:
    if optimizer is None:
        return []
    if isinstance(optimizer, Sequence):
        return list(optimizer)
    return [optimizer]


def _grad_rows(tables: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows with a gradient, per table: the rows a row-exact step can change."""
    rows = {}
    for name, param in tables.items():
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            rows[name] = grad.coalesce().indices()[0]  # [nnz]
        else:
            # A full read of the dense gradient [N, D], still a third of an update.
            rows[name] = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows



# -- optimizer row exactness ---------------------------------------------------


def _leaf_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The optimizers inside TorchRec's combined and wrapping optimizers."""
    inner = getattr(optimizer, "_optims", None)
    if inner is not None:  # torchrec CombinedOptimizer: [(key, optimizer)]
        for _, child in inner:
            yield from _leaf_optimizers(child)
        return
    wrapped = getattr(optimizer, "_optimizer", None)
    if isinstance(wrapped, torch.optim.Optimizer):  # torchrec wrappers
        yield from _leaf_optimizers(wrapped)
        return
    yield optimizer


def _param_groups(optimizer) -> list[dict]:
    return [g for leaf in _leaf_optimizers(optimizer) for g in leaf.param_groups]


def _inexact_reason(optimizers: list, param: torch.Tensor) -> str | None:
    """Why stepping ``param`` may change rows without gradient; None if not."""
    for optimizer in optimizers:
        for leaf in _leaf_optimizers(optimizer):
            for group in leaf.param_groups:
                if any(p is param for p in group["params"]):
                    return _group_reason(leaf, group)
    return "the given optimizers do not hold it"


def _group_reason(optimizer, group: dict) -> str | None:
    kind = type(optimizer).__name__
    decay = group.get("weight_decay", 0.0)
    if isinstance(optimizer, torch.optim.SGD):
        if group.get("momentum", 0.0):
            return "SGD momentum keeps moving rows after their gradient is gone"
        return "SGD weight decay shrinks every row" if decay else None
    if isinstance(optimizer, torch.optim.SparseAdam):
        return None
    if isinstance(optimizer, torch.optim.Adagrad) or kind == "RowWiseAdagrad":
        return f"{kind} weight decay shrinks every row" if decay else None
    if _is_fused(optimizer):
        # TorchRec's fused (FBGEMM) optimizers update only the looked-up rows.
        return None
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return (
            f"dense {kind} moves every row with nonzero moments; "
            "SparseAdam is the row-exact Adam"
        )
    return f"{kind} is not known to leave rows without gradient unchanged"


def _is_fused(optimizer) -> bool:
    try:
        from torchrec.optim.fused import FusedOptimizer
    except ImportError:
        return False
    return isinstance(optimizer, FusedOptimizer)
