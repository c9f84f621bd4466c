"""Keeps the server's resident memory tracking its live heap, on glibc.

A server that builds and drops many small tensors and JSON bodies from
several threads grows under glibc's defaults although its live heap does not:
each thread that contends for the allocator gets an arena of its own (up to 8
per core), and freed memory at the top of an arena's heap, or in the middle
of it, stays mapped. Two fixes, both glibc calls through ``ctypes``:

* fewer arenas (``mallopt(M_ARENA_MAX, n)``), set before the threadpool
  starts, so freed blocks are reused across threads instead of parked per
  thread;
* ``malloc_trim(0)`` every few seconds, which hands whole free pages of every
  arena back to the kernel.

Elsewhere (musl, macOS) both are no-ops that say so once in the log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from functools import cache

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # from glibc's malloc.h


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


def limit_arenas(arenas: int) -> bool:
    """Caps glibc's malloc arenas; call it before threads start allocating.

    Args:
        arenas: the most arenas; 0 leaves glibc's default.

    Returns:
        Whether the cap was set.
    """
    libc = _libc()
    if arenas < 1 or libc is None:
        return False
    ok = bool(libc.mallopt(M_ARENA_MAX, arenas))
    logger.info("malloc arenas capped at %d: %s", arenas, "yes" if ok else "refused")
    return ok


def trim() -> bool:
    """Returns free heap pages to the kernel.

    Returns:
        Whether any memory was released.
    """
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


class Trimmer:
    """A daemon thread that calls :func:`trim` every ``interval_s`` seconds."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="malloc-trim", daemon=True
        )

    def start(self) -> Trimmer:
        if _libc() is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            trim()
            self.trims += 1
