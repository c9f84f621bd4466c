"""A multi-tensor ``lerp_`` that keeps every CPU core busy on small tensors.

On CUDA, ``torch._foreach_lerp_`` is one fused kernel launch for the whole
list. On CPU it loops over the tensors in C++, and torch splits a tensor
across its intra-op threads only above its grain size (32,768 elements), so a
model of many small tensors is averaged on one core. :class:`SplitLerp` runs
the large tensors with one foreach call (torch parallelises each of them) and
then the small ones in ``torch.get_num_threads()`` groups of about equal size,
side by side: torch releases the GIL inside the op, so the groups run on
separate cores.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# at::internal::GRAIN_SIZE: torch parallelises a pointwise op over larger tensors.
GRAIN = 32_768
# Below this many small-tensor elements, a thread hand-off costs more than it saves.
MIN_SPLIT = 1 << 20

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()

Weight = float | list[float]


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="ema-lerp")
            _pool_size = workers
        return _pool


def _picker(indices: list[int]) -> Callable[[Sequence], list]:
    """Selects ``indices`` from a sequence, in C, as a list."""
    if len(indices) == 1:
        (only,) = indices
        return lambda items: [items[only]]
    get = operator.itemgetter(*indices)
    return lambda items: list(get(items))


class SplitLerp:
    """``lerp_`` of a fixed list of shadows towards sources, split across cores.

    The split is worked out once, from the shadows' sizes; each call then
    selects the groups from the sources (and per-tensor weights) it is given.

    Args:
        shadows: the tensors written, in place.
    """

    def __init__(self, shadows: list[torch.Tensor]) -> None:
        self.shadows = shadows
        threads = torch.get_num_threads()
        self.threads = threads
        on_cpu = bool(shadows) and all(s.device.type == "cpu" for s in shadows)
        small = [i for i, s in enumerate(shadows) if s.numel() < GRAIN]
        small_numel = sum(shadows[i].numel() for i in small)
        if not on_cpu or threads < 2 or small_numel < MIN_SPLIT:
            self.groups: list[list[int]] = []
            return
        large = [i for i, s in enumerate(shadows) if s.numel() >= GRAIN]
        loads = [0] * threads
        groups: list[list[int]] = [[] for _ in range(threads)]
        # Largest first, each to the lightest group: near-equal loads.
        for i in sorted(small, key=lambda i: -shadows[i].numel()):
            lightest = loads.index(min(loads))
            groups[lightest].append(i)
            loads[lightest] += shadows[i].numel()
        self.groups = [sorted(g) for g in ([large] + groups) if g]
        self._large = bool(large)
        self._pickers = [_picker(g) for g in self.groups]
        self._shadow_groups = [pick(shadows) for pick in self._pickers]

    @property
    def split(self) -> bool:
        """Whether the small tensors are spread over several threads."""
        return bool(self.groups)

    def __call__(self, sources: list[torch.Tensor], weight: Weight) -> None:
        """``shadow.lerp_(source, weight)`` for every pair.

        Args:
            sources: one float32 tensor per shadow, in the same order.
            weight: one weight for all, or one per tensor.
        """
        if not self.split or torch.get_num_threads() != self.threads:
            torch._foreach_lerp_(self.shadows, sources, weight)
            return
        per_tensor = isinstance(weight, list)
        calls = [
            (shadows, pick(sources), pick(weight) if per_tensor else weight)
            for pick, shadows in zip(self._pickers, self._shadow_groups, strict=True)
        ]
        if self._large:
            torch._foreach_lerp_(*calls.pop(0))
        first, rest = calls[0], calls[1:]
        futures = []
        if rest:
            pool = _executor(len(rest))
            futures = [pool.submit(torch._foreach_lerp_, *call) for call in rest]
        torch._foreach_lerp_(*first)
        for future in futures:
            future.result()


class Packed:
    """Small tensors of one dtype and device moved into one flat buffer.

    On CPU every torch op costs a few microseconds to dispatch, ``foreach`` ops
    included (they loop over their tensors in C++), so averaging thousands of
    small tensors is bound by the count, not the bytes. Packed, the model's
    tensors become views of one ``source`` buffer and their float32 shadows
    views of one ``shadow`` buffer, and an update is a single ``lerp_`` over
    each pair. The tensors keep their objects and values (``tensor.data`` is
    re-pointed, as the optimizer holds the objects), so the model trains as
    before; saving a packed tensor alone saves the whole buffer.

    Args:
        names: the tensors' names in the model.
        tensors: the model's tensors, one dtype and device, plain strided.
        shadows: their float32 shadows, same order and shapes.
    """

    def __init__(
        self,
        names: list[str],
        tensors: list[torch.Tensor],
        shadows: list[torch.Tensor],
    ):
        first = tensors[0]
        self.names = names
        total = sum(t.numel() for t in tensors)
        self.source = torch.empty(total, dtype=first.dtype, device=first.device)
        self.shadow = torch.empty(total, dtype=torch.float32, device=first.device)
        self.members = tensors
        self.shadows: list[torch.Tensor] = []
        offset = 0
        with torch.no_grad():
            for tensor, shadow in zip(tensors, shadows, strict=True):
                size = tensor.numel()
                source_view = self.source[offset : offset + size].view(tensor.shape)
                shadow_view = self.shadow[offset : offset + size].view(tensor.shape)
                source_view.copy_(tensor)
                shadow_view.copy_(shadow)
                tensor.data = source_view
                self.shadows.append(shadow_view)
                offset += size
        self.pointers = self._pointers()

    def _pointers(self) -> list[int]:
        return list(map(torch.Tensor.data_ptr, self.members))

    def intact(self) -> bool:
        """Whether every member still lives in the buffer (cheap, C-speed).

        ``tensor.data = other``, ``module.to(...)`` or ``.half()`` give a
        member new storage: it no longer reads from the buffer.
        """
        return self._pointers() == self.pointers

    def holds(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``tensors`` (name to tensor) has these members by name."""
        return all(
            tensors.get(name) is member
            for name, member in zip(self.names, self.members, strict=True)
        )

    @property
    def numel(self) -> int:
        return self.source.numel()


def packable(tensor: torch.Tensor) -> bool:
    """A small, plain, dense floating tensor (no subclass such as a DTensor)."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout == torch.strided
        and tensor.is_floating_point()
        and tensor.numel() < GRAIN
    )
