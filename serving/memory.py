"""Keeps the server's resident memory tracking its live heap, on glibc.

A server that builds and drops many small tensors and JSON bodies from
several threads grows under glibc's defaults although its live heap does not:
each thread that contends for the allocator gets an arena of its own (up to 8
per core), and freed memory at the top of an arena's heap, or in the middle
of it, stays mapped. Three glibc calls through ``ctypes`` limit that:

* fewer arenas (``mallopt(M_ARENA_MAX, n)``), set before the threadpool
  starts, so freed blocks are reused across threads instead of parked per
  thread;
* a fixed mmap threshold (``mallopt(M_MMAP_THRESHOLD, bytes)``): glibc raises
  its threshold each time a large block is freed, up to 32 MiB, after which
  every request's score and feature tensors (about 1 MB for one user against
  the catalogue) are carved out of the arena heaps and fragment them; above a
  fixed threshold they are mapped and unmapped whole;
* ``malloc_trim(0)`` every few seconds, which hands whole free pages of every
  arena back to the kernel.

They were not enough on their own. What kept RSS climbing was Python's own
heap: request handling leaves reference cycles that only a full collection
frees, and the interpreter runs one rarely once the imports hold half a
million long-lived objects (and each then takes about 230 ms with the GIL
held), so garbage piled up for minutes between collections.
:func:`freeze_startup` moves everything alive after start-up out of the
collector's sight (``gc.freeze``), which makes a full collection cheap, and
:class:`Trimmer` runs one before each trim.

Elsewhere (musl, macOS) the malloc calls are no-ops that say so once in the
log.

Buffers that fill while serving (the recommendation log, the latency
reservoirs) are made with :func:`resident_zeros`, so filling them does not
grow the process either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from functools import cache

import numpy as np

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
M_ARENA_MAX = -8


def resident_zeros(shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
    """A zeroed array whose pages are in memory now: ``np.zeros`` of a large
    array maps pages on first write, so a buffer filled while serving would
    make the process grow as it fills."""
    array = np.empty(shape, dtype=dtype)
    array.fill(0)
    return array


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError) as exc:
        logger.info("no glibc malloc controls here (%s); memory left as is", exc)
        return None
    return libc


def _mallopt(option: int, value: int, what: str) -> bool:
    """Sets one glibc malloc option; a value below 1 leaves glibc's default."""
    libc = _libc()
    if value < 1 or libc is None:
        return False
    ok = bool(libc.mallopt(option, value))
    logger.info("malloc %s set to %d: %s", what, value, "yes" if ok else "refused")
    return ok


def limit_arenas(arenas: int) -> bool:
    """Caps glibc's malloc arenas; call it before threads start allocating.

    Args:
        arenas: the most arenas; 0 leaves glibc's default.

    Returns:
        Whether the cap was set.
    """
    return _mallopt(M_ARENA_MAX, arenas, "arena cap")


def fix_mmap_threshold(threshold: int) -> bool:
    """Maps blocks of at least ``threshold`` bytes on their own, always.

    Args:
        threshold: bytes; 0 leaves glibc's sliding threshold.

    Returns:
        Whether the threshold was set.
    """
    return _mallopt(M_MMAP_THRESHOLD, threshold, "mmap threshold (bytes)")


def trim() -> bool:
    """Returns free heap pages to the kernel.

    Returns:
        Whether any memory was released.
    """
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


def freeze_startup() -> int:
    """Collects, then exempts every object alive now from later collections.

    Returns:
        How many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Hands the frozen objects back to the collector."""
    gc.unfreeze()


def refreeze() -> int:
    """Collects what was frozen and died since (a model swapped out), then
    freezes what is alive now. One full collection: a pause of a few hundred
    milliseconds with a model and its libraries loaded.

    Returns:
        How many objects are frozen now.
    """
    gc.unfreeze()
    return freeze_startup()


class Trimmer:
    """A daemon thread that runs a full garbage collection and then :func:`trim`
    every ``interval_s`` seconds."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="malloc-trim", daemon=True
        )

    def start(self) -> Trimmer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            gc.collect()
            trim()
            self.trims += 1
