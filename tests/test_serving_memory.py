"""The recommendation log's bookkeeping and size, and the malloc controls."""

from __future__ import annotations

import ctypes
import os
import time
import tracemalloc
import uuid

import numpy as np
import pytest

from serving import memory
from serving.recommendations import RecommendationLog, log_bytes

K = 10


def test_feedback_is_counted_once_across_and_within_calls() -> None:
    log = RecommendationLog(10)
    stored = log.add("warm", "3", list(range(100, 100 + K)))

    first = log.record(stored.recommendation_id, [100, 101, 101], [101])
    again = log.record(stored.recommendation_id, [101, 102], [101, 102])

    assert (first.new_impressions, first.new_clicks, first.duplicates) == (2, 1, 1)
    assert (again.new_impressions, again.new_clicks, again.duplicates) == (1, 1, 2)
    assert log.get(stored.recommendation_id) == stored
    assert stored.item_ids == tuple(range(100, 100 + K))


def test_oldest_go_first_when_the_slots_run_out() -> None:
    log = RecommendationLog(2)
    a, b = log.add("warm", "1", [1]), log.add("cold", "2", [2])
    log.record(a.recommendation_id, [1], [])  # feedback does not keep it longer
    c = log.add("warm", "1", [3])

    assert log.get(a.recommendation_id) is None
    assert log.get(b.recommendation_id) == b
    assert log.get(c.recommendation_id) == c
    with pytest.raises(KeyError):
        log.record(a.recommendation_id, [1], [])
    assert len(log) == 2


def test_oldest_go_first_when_the_item_cells_run_out() -> None:
    log = RecommendationLog(100, items=20)
    first, second = log.add("warm", "1", list(range(10))), log.add("warm", "1", [7])
    # Cells 11..19, then 0: the run wraps over the first recommendation's items.
    third = log.add("cold", "1", list(range(20, 30)))
    log.record(third.recommendation_id, [20, 29], [29])

    assert log.get(first.recommendation_id) is None
    assert log.get(second.recommendation_id) == second
    assert log.get(third.recommendation_id).item_ids == third.item_ids
    assert log.get(third.recommendation_id).impressed == {20, 29}
    assert len(log) == 2
    with pytest.raises(ValueError, match="EMAREC_RECOMMENDATION_CACHE_ITEMS"):
        log.add("warm", "1", list(range(21)))


def test_the_log_keeps_every_recommendation_its_items_fit() -> None:
    """No cells are skipped: the latest recommendations holding up to
    ``items`` items together are all kept, whatever their sizes."""
    log = RecommendationLog(3, items=120)
    log.add("warm", "1", list(range(10)))
    middle = log.add("warm", "1", list(range(100, 200)))
    newest = log.add("warm", "1", list(range(200, 220)))

    assert log.get(middle.recommendation_id) == middle  # 100 + 20 = 120 items
    assert log.get(newest.recommendation_id) == newest


def test_feedback_counts_ignore_items_not_recommended() -> None:
    log = RecommendationLog(4)
    stored = log.add("warm", "1", [5, 6])

    outcome = log.record(stored.recommendation_id, [99, 5, 5], [98])

    assert (outcome.new_impressions, outcome.new_clicks, outcome.duplicates) == (
        1,
        0,
        1,
    )
    with pytest.raises(ValueError, match="cohort"):
        log.add("lukewarm", "1", [1])
    assert log.get(None) is None and log.get(12) is None


def test_ids_that_are_not_the_logs_are_unknown() -> None:
    log = RecommendationLog(4)
    stored = log.add("warm", "1", [5, 6])
    forged = uuid.UUID(stored.recommendation_id).int ^ 1  # same slot, other bits

    assert log.get(str(uuid.UUID(int=forged))) is None
    assert log.get(str(uuid.uuid4())) is None  # a slot far outside the log
    assert log.get("not-a-uuid") is None
    assert uuid.UUID(stored.recommendation_id).version == 4


def test_the_log_is_resident_from_the_start_and_does_not_grow() -> None:
    entries = 20_000
    tracemalloc.start()
    log = RecommendationLog(entries)
    allocated = tracemalloc.get_traced_memory()[0]
    for i in range(3 * entries):  # wraps around three times
        items = list(range(1000 + i, 1000 + i + K))
        stored = log.add("warm", str(i // 5000), items)
        log.record(stored.recommendation_id, items, items[:1])
    grown = tracemalloc.get_traced_memory()[0] - allocated
    tracemalloc.stop()

    assert allocated >= log.nbytes == log_bytes(entries, 10 * entries)
    assert grown < 10_000, grown  # the version names, nothing per entry
    assert len(log) == entries


def test_the_log_is_resident_when_made() -> None:
    log = RecommendationLog(200_000)  # about 26 MB
    arrays = [a for a in vars(log).values() if isinstance(a, np.ndarray)]

    # np.zeros of this size maps pages on first write: memory would grow as
    # the log fills. Every page of every array is in memory from the start.
    assert sum(a.nbytes for a in arrays) == log.nbytes
    for array in arrays:
        assert _resident_fraction(array) == 1.0


def _resident_fraction(array: np.ndarray) -> float:
    """Share of the pages under ``array`` that are in memory (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    address = array.__array_interface__["data"][0]
    start = address - address % page
    pages = -(-(address + array.nbytes - start) // page)
    flags = (ctypes.c_ubyte * pages)()
    status = libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), flags)
    assert status == 0, os.strerror(ctypes.get_errno())
    return sum(flag & 1 for flag in flags) / pages


def test_malloc_controls_work_on_glibc() -> None:
    if memory._libc() is None:
        pytest.fail("these tests run on glibc; the controls found no libc")
    assert memory.limit_arenas(2)
    assert not memory.limit_arenas(0)
    blocks = [bytearray(64 * 1024) for _ in range(2000)]  # ~128 MB, then freed
    del blocks
    assert isinstance(memory.trim(), bool)


def test_trimmer_trims_until_stopped() -> None:
    trimmer = memory.Trimmer(0.01).start()
    # Each trim walks the whole heap of this test process (GBs after the
    # suite's models): on a loaded 2-core machine one can take seconds.
    deadline = time.monotonic() + 60
    while trimmer.trims < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    done = trimmer.trims
    time.sleep(0.05)

    assert done >= 3
    assert trimmer.trims == done


def test_mmap_threshold_is_set_and_zero_leaves_it() -> None:
    # What glibc's sliding threshold tops out at: the test process keeps it.
    assert memory.fix_mmap_threshold(32 * 1024 * 1024)
    assert not memory.fix_mmap_threshold(0)


def test_frozen_objects_are_collected_after_a_refreeze() -> None:
    import gc
    import weakref

    class Node:
        pass

    node = Node()
    node.self = node  # a cycle: only the collector frees it
    alive = weakref.ref(node)
    try:
        assert memory.freeze_startup() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen: out of the collector's sight
        memory.refreeze()
        assert alive() is None
    finally:
        memory.unfreeze()
    assert gc.get_freeze_count() == 0
