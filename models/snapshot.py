"""Asynchronous double buffer: readers see a whole teacher, never a half-updated one.

The writer fills the back slot (on a worker thread, overlapping the next
training step's forward and backward) and then swaps it in with one reference
assignment under a lock. A reader leases the front slot for as long as it uses
it; a slot still leased when the writer wants it is left to its reader and a
fresh slot is allocated instead, so neither side waits for the other.
"""

from __future__ import annotations

import copy
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from models.ema import named_state

logger = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """A published teacher: ``module`` holds the weights of ``version``."""

    module: nn.Module
    version: int = 0
    num_updates: int = 0
    leases: int = field(default=0, repr=False)


class DoubleBuffer:
    """Publishes EMA shadows as teacher snapshots.

    Args:
        template: a module of the teacher's structure; copied for each slot.
        background: fill the back slot on a worker thread.
        factory: makes a slot's module instead of copying ``template`` (a
            sharded teacher cannot be deep-copied; its snapshots are sharded
            the same way and each rank fills its own shards).
    """

    def __init__(
        self,
        template: nn.Module,
        background: bool = True,
        factory: Callable[[], nn.Module] | None = None,
    ):
        if factory is None:
            self._template = copy.deepcopy(template).eval().requires_grad_(False)
            factory = lambda: copy.deepcopy(self._template)  # noqa: E731
        # Fused tables' weights are views, not leaves: readers use no_grad.
        self._factory = lambda: factory().eval()
        self._front = Snapshot(self._factory())
        self._back = Snapshot(self._factory())
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, "snapshot") if background else None
        self._pending: Future | None = None

    @property
    def version(self) -> int:
        return self._front.version

    @property
    def num_updates(self) -> int:
        """The EMA update count of the front snapshot's weights."""
        return self._front.num_updates

    def publish(self, shadow: dict[str, torch.Tensor], num_updates: int) -> None:
        """Starts filling the back slot from ``shadow`` and swaps it in when full.

        The caller must not change ``shadow`` until ``wait()`` returns; the
        trainer calls ``wait()`` just before its next EMA update.
        """
        self.wait()
        with self._lock:
            slot = self._back
            if slot.leases:
                # A reader still holds the old front: leave it to them.
                slot = Snapshot(self._factory())
            version = self._front.version + 1
        if self._executor is None:
            self._fill_and_swap(slot, shadow, version, num_updates)
        else:
            self._pending = self._executor.submit(
                self._fill_and_swap, slot, shadow, version, num_updates
            )

    def wait(self) -> None:
        """Blocks until the publish in flight, if any, has swapped in."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    @torch.no_grad()
    def _fill_and_swap(
        self, slot: Snapshot, shadow: dict[str, torch.Tensor], version: int, n: int
    ) -> None:
        state = dict(named_state(slot.module))
        targets = [state[name] for name in shadow]
        torch._foreach_copy_(targets, list(shadow.values()))
        slot.version, slot.num_updates = version, n
        with self._lock:
            self._front, self._back = slot, self._front
        logger.debug("published teacher snapshot %d", version)

    @contextmanager
    def read(self) -> Iterator[Snapshot]:
        """Leases the current snapshot; it stays whole until the block exits."""
        with self._lock:
            snapshot = self._front
            snapshot.leases += 1
        try:
            yield snapshot
        finally:
            with self._lock:
                snapshot.leases -= 1

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
