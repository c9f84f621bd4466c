"""EMA update cost: memory bandwidth, multi-tensor speedup, lazy tables.

Three measurements, each the best (or median) of several repetitions, with
torch's thread settings as they are:

* dense: ``EMA.update`` on a ~100M-parameter float32 model, as GB/s (12 bytes
  per element: read shadow, read source, write shadow), against the machine's
  stream bandwidth - a single ``lerp_`` over one flat tensor of the same size,
  the same two reads and a write at their fastest;
* loop: ``EMA.update`` with ``contiguous=True`` (the small tensors packed
  into one buffer, one ``lerp_``) against the naive loop
  ``s.data = d * s.data + (1 - d) * p`` over 2,000 small tensors of 1,000 to
  10,000 elements; the unpacked multi-tensor update is reported beside it
  (``ema_vs_loop_speedup_unpacked``): on CPU it pays torch's per-tensor
  dispatch once per tensor, the loop three times;
* lazy: a lazy table against the dense update of the same table, 10M rows of
  16 floats, 1% of the rows (random) touched per step.

Both the lazy and the dense table update are timed with the process's large
allocations on transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, set by
``python -m bench`` before torch starts): random rows of a 640 MB table
otherwise also pay a page-table walk each.
"""

from __future__ import annotations

import functools
import gc
import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from models.ema import EMA

logger = logging.getLogger(__name__)

DENSE_BIG = (4, 24_000_000)  # four big tensors ...
DENSE_SMALL = (200, 20_000)  # ... and many small ones: 100M parameters
LOOP_TENSORS, LOOP_SIZES = 2_000, (1_000, 10_000)
TABLE_ROWS, TABLE_DIM, TOUCHED = 10_000_000, 16, 0.01
LAZY_STEPS = 30
REPEATS = 15
BYTES_PER_ELEMENT = 12  # fp32 shadow read + source read + shadow write


def best_seconds(fn: Callable[[], None], repeats: int = REPEATS) -> float:
    """The fastest of ``repeats`` timed calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


class Params(nn.Module):
    """A module holding the given tensors as parameters ``params.0, params.1, ...``."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(t) for t in tensors)


def dense_bandwidth() -> dict:
    """Dense ``EMA.update`` GB/s on ~100M parameters vs the stream bandwidth.

    Returns:
        ``ema_dense_gbps``, ``stream_gbps``, ``stream_copy_gbps``,
        ``ema_dense_bandwidth_ratio`` and ``ema_dense_params``.
    """
    count, size = DENSE_BIG
    small, small_size = DENSE_SMALL
    sizes = [size] * count + [small_size] * small
    model = Params([torch.rand(n) for n in sizes])
    numel = sum(sizes)
    ema = EMA(model, decay=0.999, warmup=False)
    dense = best_seconds(lambda: ema.update(model))
    del ema, model
    gc.collect()
    start, end = torch.rand(numel), torch.rand(numel)  # [numel] each
    triad = best_seconds(lambda: start.lerp_(end, 0.001))
    copy = best_seconds(lambda: start.copy_(end))
    dense_gbps = BYTES_PER_ELEMENT * numel / dense / 1e9
    stream_gbps = BYTES_PER_ELEMENT * numel / triad / 1e9
    return {
        "ema_dense_params": numel,
        "ema_dense_gbps": round(dense_gbps, 2),
        "stream_gbps": round(stream_gbps, 2),
        "stream_copy_gbps": round(8 * numel / copy / 1e9, 2),
        "ema_dense_bandwidth_ratio": round(dense_gbps / stream_gbps, 3),
    }


def loop_speedup() -> dict:
    """Packed and multi-tensor ``EMA.update`` vs the naive per-parameter loop.

    Returns:
        ``ema_loop_seconds``, ``ema_foreach_seconds`` (packed),
        ``ema_vs_loop_speedup``, and the same for the unpacked update
        (``..._unpacked``).
    """
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(*LOOP_SIZES, (LOOP_TENSORS,), generator=generator)
    model = Params([torch.rand(int(n), generator=generator) for n in sizes])
    unpacked = EMA(model, decay=0.999, warmup=False)
    ema = EMA(model, decay=0.999, warmup=False, contiguous=True)
    shadows = [t.clone() for t in model.parameters()]
    decay = 0.999

    @torch.no_grad()
    def naive() -> None:
        for shadow, param in zip(shadows, model.parameters(), strict=True):
            shadow.data = decay * shadow.data + (1 - decay) * param

    loop = best_seconds(naive)
    foreach = best_seconds(lambda: ema.update(model))
    foreach_unpacked = best_seconds(lambda: unpacked.update(model))
    return {
        "ema_loop_tensors": LOOP_TENSORS,
        "ema_loop_seconds": round(loop, 5),
        "ema_foreach_seconds": round(foreach, 5),
        "ema_vs_loop_speedup": round(loop / foreach, 1),
        "ema_foreach_unpacked_seconds": round(foreach_unpacked, 5),
        "ema_vs_loop_speedup_unpacked": round(loop / foreach_unpacked, 1),
    }


class Table(nn.Module):
    """One TorchRec-named table: ``embedding_bags.t.weight``, ``[rows, dim]``."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        weight = torch.empty(rows, dim).uniform_(-0.05, 0.05)
        bag = nn.EmbeddingBag(rows, dim, _weight=weight)  # no second init pass
        self.embedding_bags = nn.ModuleDict({"t": bag})

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding_bags["t"].weight


def lazy_speedup() -> dict:
    """Per-step time of a lazy table vs its dense update, and their difference.

    Both EMAs follow the same table; a stand-in optimizer moves 1% random rows
    per step (not timed). The lazy EMA's time is ``prepare`` plus ``update``.

    Beside them, the machine's ceiling for any exact lazy step: a plain
    ``index_select`` of the step's rows of the table alone, timed on the same
    rows: a catch-up must read those rows, and read and write the same rows
    of the shadow besides.

    Returns:
        ``ema_lazy_step_seconds``, ``ema_dense_step_seconds`` (best steps),
        ``ema_lazy_vs_dense_speedup`` (of the best steps, and ``_median`` of
        the median steps), ``ema_lazy_gather_seconds`` (best gather) and
        ``ema_lazy_gather_vs_dense`` (the dense step over it),
        ``ema_lazy_sync_seconds`` (one full catch-up) and
        ``ema_lazy_max_abs_diff`` (after that catch-up).
    """
    model = Table(TABLE_ROWS, TABLE_DIM)
    name = "embedding_bags.t.weight"
    dense = EMA(model, decay=0.995, warmup=True)
    lazy = EMA(model, decay=0.995, warmup=True, lazy_tables=True)
    generator = torch.Generator().manual_seed(0)
    touched = int(TABLE_ROWS * TOUCHED)
    lazy_times, dense_times, gather_times = [], [], []
    gathered, weight = torch.empty(touched, TABLE_DIM), model.weight.detach()  # [R, D]
    for _ in range(LAZY_STEPS):
        rows = torch.randint(0, TABLE_ROWS, (touched,), generator=generator)  # [R]
        gather = functools.partial(torch.index_select, weight, 0, rows, out=gathered)
        gather_times.append(_timed(gather))
        started = time.perf_counter()
        lazy.prepare({name: rows})
        lazy_times.append(time.perf_counter() - started)
        step = torch.randn(touched, TABLE_DIM, generator=generator) * 1e-2  # [R, D]
        with torch.no_grad():
            model.weight.index_add_(0, rows, step)
        lazy_times[-1] += _timed(lambda: lazy.update(model))
        dense_times.append(_timed(lambda: dense.update(model)))
    sync = _timed(lazy.sync_all)
    diff = (lazy.shadow[name] - dense.shadow[name]).abs().max().item()
    # Best steps, as for the bandwidth; medians too, as a shared machine's
    # other work lands on some steps.
    lazy_step, dense_step = min(lazy_times), min(dense_times)
    median = statistics.median(dense_times) / statistics.median(lazy_times)
    return {
        "ema_lazy_table_shape": f"{TABLE_ROWS}x{TABLE_DIM}",
        "ema_lazy_touched_fraction": TOUCHED,
        "ema_lazy_step_seconds": round(lazy_step, 5),
        "ema_dense_step_seconds": round(dense_step, 5),
        "ema_lazy_vs_dense_speedup": round(dense_step / lazy_step, 1),
        "ema_lazy_vs_dense_speedup_median": round(median, 1),
        "ema_lazy_gather_seconds": round(min(gather_times), 5),
        "ema_lazy_gather_vs_dense": round(dense_step / min(gather_times), 1),
        "ema_lazy_sync_seconds": round(sync, 4),
        "ema_lazy_max_abs_diff": diff,
    }


def _timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run() -> dict:
    """Runs the three measurements, freeing memory between them.

    Returns:
        All figures, one flat dict.
    """
    results = {"torch_threads": torch.get_num_threads()}
    for measure in (dense_bandwidth, loop_speedup, lazy_speedup):
        logger.info("measuring %s", measure.__name__)
        results.update(measure())
        gc.collect()
    for key, value in results.items():
        print(f"  {key:<28} {value}")
    return results
