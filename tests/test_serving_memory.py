"""The recommendation log's bookkeeping and size, and the malloc controls."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from serving import memory
from serving.recommendations import RecommendationLog

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


def test_least_recently_used_go_first() -> None:
    log = RecommendationLog(2)
    a, b = log.add("warm", "1", [1]), log.add("cold", "1", [2])
    log.record(a.recommendation_id, [1], [])  # a is now the most recent
    log.add("warm", "1", [3])

    assert log.get(b.recommendation_id) is None
    assert log.get(a.recommendation_id) == a
    with pytest.raises(KeyError):
        log.record(b.recommendation_id, [2], [])
    assert len(log) == 2


def test_an_entry_with_its_feedback_stays_small() -> None:
    entries = 2000
    log = RecommendationLog(entries)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(entries):
        items = list(range(1000 + i, 1000 + i + K))
        stored = log.add("warm", "12", items)
        log.record(stored.recommendation_id, items, items[:1])
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / entries
    tracemalloc.stop()

    # Two Python sets and a tuple of int objects took about 1,500 bytes.
    assert per_entry < 600, per_entry


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
    deadline = time.monotonic() + 5
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
