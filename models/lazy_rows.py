"""Catching up the rows of a lazily averaged table in one pass.

A lazy row ``r`` last caught up at update ``last[r]`` becomes
``shadow[r] + w * (source[r] - shadow[r])``, with ``w`` looked up in a small
table by ``last[r]``, and ``last[r]`` becomes ``now``. With torch ops that is
a gather of ``last``, of the weights, of the shadow rows and of the source
rows, a ``lerp_``, a scatter back and a fill: seven passes, four of them
random reads into tables far larger than any cache. On CPU a fused loop
(numba) does it in one pass, each row read and written once; random rows
cost a few cache misses each whatever is done to them, so the pass is bound
by memory latency and fusing it is what makes the lazy step cheap.

The loop is split across threads by row id (``row % threads``), not by
position in ``rows``: a row listed twice is then always handled by the same
thread, the second time with a weight of exactly zero, so duplicates are
harmless without sorting the ids first.

Other devices and dtypes keep the torch ops (``EMA`` falls back to them).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch

# numba's default thread pool (workqueue) aborts when two threads launch
# parallel kernels at once; an EMA may be prepared from more than one thread.
_launch = threading.Lock()

# Below this many rows, waking the kernel's threads costs more than it saves.
PARALLEL_ROWS = 4_096


@numba.njit(cache=True, nogil=True)
def _catch_up_serial(
    shadow, source, last, weights, base, rows, now
):  # pragma: no cover - compiled; tested through catch_up_rows
    for i in range(rows.shape[0]):
        row = rows[i]
        weight = weights[last[row] - base]
        for j in range(shadow.shape[1]):
            value = shadow[row, j]
            shadow[row, j] = value + weight * (source[row, j] - value)
        last[row] = now


@numba.njit(cache=True, nogil=True, parallel=True)
def _catch_up_parallel(
    shadow, source, last, weights, base, rows, now, threads
):  # pragma: no cover - compiled; tested through catch_up_rows
    for part in numba.prange(threads):
        for i in range(rows.shape[0]):
            row = rows[i]
            if row % threads != part:
                continue
            weight = weights[last[row] - base]
            for j in range(shadow.shape[1]):
                value = shadow[row, j]
                shadow[row, j] = value + weight * (source[row, j] - value)
            last[row] = now


def fused(shadow: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether :func:`catch_up_rows` runs the fused CPU loop for these tables."""
    return (
        shadow.device.type == "cpu"
        and source.device.type == "cpu"
        and shadow.dtype == source.dtype == torch.float32
        and shadow.is_contiguous()
        and source.is_contiguous()
        and not source.requires_grad  # .numpy() refuses tensors with autograd
    )


def catch_up_rows(
    shadow: torch.Tensor,
    source: torch.Tensor,
    last: torch.Tensor,
    weights: torch.Tensor,
    base: int,
    rows: torch.Tensor,
    now: int,
) -> None:
    """Brings ``rows`` of ``shadow`` up to date with ``source``, in place.

    For tables where :func:`fused` holds; the caller keeps torch ops for others.

    Args:
        shadow: the float32 average, ``[N, D]``.
        source: the table's current float32 weights, ``[N, D]``, detached.
        last: ``[N]`` int64, the update each row is exact through; set to
            ``now`` for ``rows``.
        weights: ``[L]`` float32 lerp weights, indexed by ``last - base``.
        base: the update count of ``weights[0]``.
        rows: ``[R]`` int64 row ids on CPU; duplicates are allowed.
        now: the current update count.

    Raises:
        IndexError: for a row id outside ``[0, N)``: the compiled loop does
            not check its reads.
    """
    if len(rows):
        low, high = torch.aminmax(rows)
        if low < 0 or high >= len(shadow):
            raise IndexError(
                f"row ids must be in [0, {len(shadow)}), got {int(low)}..{int(high)}"
            )
    arrays = (shadow.numpy(), source.numpy(), last.numpy(), weights.numpy())
    ids = rows.contiguous().numpy()
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads > 1 and len(ids) >= PARALLEL_ROWS:
        with _launch:
            _catch_up_parallel(*arrays, np.int64(base), ids, np.int64(now), threads)
    else:
        _catch_up_serial(*arrays, np.int64(base), ids, np.int64(now))
