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

The loop is split across threads by row id (``row & (threads - 1)``, the
thread count a power of two), not by position in ``rows``: a row listed twice
is then always handled by the same thread, the second time with a weight of
exactly zero, so duplicates are harmless without sorting the ids first. Each
thread asks for the rows it will reach ``AHEAD`` ids later to be fetched
(LLVM's ``prefetch``), so that many misses are in flight at once; on a 2-core
VM that took 100,000 random rows of a 10M x 16 table from about 4.3 ms to
about 2.4 ms.

Other devices and dtypes keep the torch ops (``EMA`` falls back to them).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

# numba's workqueue thread pool (its fallback where neither OpenMP nor TBB
# loads) aborts when two threads launch parallel kernels at once; an EMA may
# be prepared from more than one thread.
_launch = threading.Lock()

# Below this many rows, waking the kernel's threads costs more than it saves.
PARALLEL_ROWS = 4_096
# How many ids ahead a thread prefetches rows: far enough for the memory to
# answer, near enough that the lines are still in cache (24 to 96 measured the
# same; 12 was slower).
AHEAD = 32


@intrinsic
def _prefetch(typingctx, array, row):  # pragma: no cover - compile-time code
    """Asks for the cache line holding ``array[row, 0]`` (or ``array[row]``)."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array_value = context.make_array(array_type)(context, builder, args[0])
        zeros = [context.get_constant(types.intp, 0)] * (array_type.ndim - 1)
        pointer = cgutils.get_item_pointer(
            context, builder, array_type, array_value, [args[1], *zeros]
        )
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]),
            "llvm.prefetch.p0",
        )
        # Write intent (the row is written back), keep in all cache levels, data.
        flags = [ir.Constant(int32, value) for value in (1, 3, 1)]
        builder.call(prefetch, [builder.bitcast(pointer, byte_pointer), *flags])
        return context.get_dummy_value()

    return types.void(array, row), codegen


@numba.njit(cache=True, nogil=True)
def _catch_up_part(
    shadow, source, last, weights, base, rows, now, mask, part
):  # pragma: no cover - compiled; tested through catch_up_rows
    """The rows ``row & mask == part`` of ``rows``, in order."""
    count = rows.shape[0]
    for i in range(count):
        if i + AHEAD < count:
            ahead = rows[i + AHEAD]
            if ahead & mask == part:
                _prefetch(shadow, ahead)
                _prefetch(source, ahead)
                _prefetch(last, ahead)
        row = rows[i]
        if row & mask != part:
            continue
        weight = weights[last[row] - base]
        for j in range(shadow.shape[1]):
            value = shadow[row, j]
            shadow[row, j] = value + weight * (source[row, j] - value)
        last[row] = now


@numba.njit(cache=True, nogil=True, parallel=True)
def _catch_up_parallel(
    shadow, source, last, weights, base, rows, now, threads
):  # pragma: no cover - compiled; tested through catch_up_rows
    mask = threads - 1
    for part in numba.prange(threads):
        _catch_up_part(shadow, source, last, weights, base, rows, now, mask, part)


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
    threads = 1 << (threads.bit_length() - 1)  # a power of two, for the mask
    base, now = np.int64(base), np.int64(now)
    if threads > 1 and len(ids) >= PARALLEL_ROWS:
        with _launch:
            _catch_up_parallel(*arrays, base, ids, now, np.int64(threads))
    else:
        _catch_up_part(*arrays, base, ids, now, np.int64(0), np.int64(0))
