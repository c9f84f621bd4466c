"""Recent recommendations, kept so feedback can be matched and deduplicated.

The log is two rings allocated (and written once, so resident) when the
server starts: one slot per recommendation, and a pool of item cells that a
recommendation's items take in turn, wrapping from the last cell to the
first. Its memory is fixed from the first request on; filling it does not
make the process grow. A recommendation leaves the log when its slot or any
of its item cells is taken by a newer one, so the log holds the last
``capacity`` recommendations or the last ``items`` recommended items,
whichever is fewer; feedback then gets a 404 saying so. With k = 10 and the
defaults (100,000 and 1,000,000) that is 100,000 recommendations in about
13 MB.

A recommendation id is a random version-4 UUID whose first 32 bits are the
slot: looking one up is an index and a comparison of all 128 bits, with no
table of ids to grow.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from dataclasses import dataclass, field

import numpy as np

from serving.memory import resident_zeros

COHORTS = ("warm", "cold")
MAX_CAPACITY = 2**32 - 1  # the slot is the id's first 32 bits


@dataclass(frozen=True)
class Recommendation:
    """What was recommended, to whom and by which model.

    Attributes:
        recommendation_id: id handed to the client.
        cohort: ``warm`` or ``cold``.
        model_version: version of the model that produced it.
        item_ids: recommended items, best first.
        impressed: items already recorded as shown, when it was looked up.
    """

    recommendation_id: str
    cohort: str
    model_version: str
    item_ids: tuple[int, ...]
    impressed: frozenset[int] = field(default=frozenset(), compare=False)


@dataclass(frozen=True)
class FeedbackOutcome:
    """How much of one feedback was new.

    Attributes:
        new_impressions: impressions not recorded before.
        new_clicks: clicks not recorded before.
        duplicates: impressions and clicks already recorded, including
            repeats within the same feedback.
    """

    new_impressions: int
    new_clicks: int
    duplicates: int


SLOT_BYTES = 16 + 1 + 4 + 8 + 4  # id, cohort, version, first cell, count
CELL_BYTES = 8 + 1 + 1  # item, shown, clicked


def log_bytes(capacity: int, items: int) -> int:
    """Bytes a :class:`RecommendationLog` of this size allocates."""
    return capacity * SLOT_BYTES + items * CELL_BYTES


class RecommendationLog:
    """A thread-safe, fixed-size log of the latest recommendations."""

    def __init__(self, capacity: int, items: int | None = None) -> None:
        """Allocate the log.

        Args:
            capacity: recommendations kept, at most.
            items: recommended items kept, at most (default ``10 * capacity``);
                one recommendation may hold up to this many.

        Raises:
            ValueError: capacity below 1 or above 2**32 - 1, or items below 1.
        """
        items = 10 * capacity if items is None else items
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be in [1, {MAX_CAPACITY}], got {capacity}")
        if items < 1:
            raise ValueError(f"items must be >= 1, got {items}")
        self._capacity, self._pool = capacity, items
        self._ids = resident_zeros((capacity, 2), np.uint64)  # [C, 2] the id's 128 bits
        self._cohort = resident_zeros(capacity, np.uint8)  # [C] index into COHORTS
        self._version = resident_zeros(capacity, np.uint32)  # [C] index into _versions
        # [C] first item cell, absolute
        self._start = resident_zeros(capacity, np.int64)
        self._count = resident_zeros(capacity, np.int32)  # [C]
        self._items = resident_zeros(items, np.int64)  # [I]
        self._impressed = resident_zeros(items, np.bool_)  # [I]
        self._clicked = resident_zeros(items, np.bool_)  # [I]
        self._versions: list[str] = []
        self._version_index: dict[str, int] = {}
        self._added = 0  # recommendations ever added
        self._cells = 0  # item cells ever taken, absolute
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """How many recommendations are kept, at most."""
        return self._capacity

    @property
    def item_capacity(self) -> int:
        """How many recommended items are kept, at most."""
        return self._pool

    @property
    def nbytes(self) -> int:
        """Bytes the log's arrays take."""
        arrays = (self._ids, self._cohort, self._version, self._start, self._count)
        cells = (self._items, self._impressed, self._clicked)
        return sum(a.nbytes for a in (*arrays, *cells))

    def __len__(self) -> int:
        """Recommendations that feedback can still reach."""
        with self._lock:
            kept = min(self._added, self._capacity)
            starts = self._start[:kept] if kept < self._capacity else self._start
            return int(np.count_nonzero(starts >= self._cells - self._pool))

    def add(
        self, cohort: str, model_version: str, item_ids: list[int]
    ) -> Recommendation:
        """Remember a new recommendation under a fresh id.

        Args:
            cohort: ``warm`` or ``cold``.
            model_version: version of the model that produced it.
            item_ids: recommended items, best first; distinct.

        Returns:
            The stored recommendation with its new id.

        Raises:
            ValueError: more items than the log holds, or an unknown cohort.
        """
        item_ids = [int(item) for item in item_ids]
        count = len(item_ids)
        if count > self._pool:
            raise ValueError(
                f"a recommendation of {count} items does not fit a log of "
                f"{self._pool} items; raise EMAREC_RECOMMENDATION_CACHE_ITEMS"
            )
        if cohort not in COHORTS:
            raise ValueError(f"cohort must be one of {COHORTS}, got {cohort!r}")
        raw = bytearray(secrets.token_bytes(16))
        with self._lock:
            slot = self._added % self._capacity
            raw[:4] = slot.to_bytes(4, "big")
            recommendation_id = uuid.UUID(bytes=bytes(raw), version=4)
            start = self._cells
            cells = self._cells_at(start, count)
            self._items[cells] = item_ids
            self._impressed[cells] = False
            self._clicked[cells] = False
            self._ids[slot] = divmod(recommendation_id.int, 2**64)
            self._cohort[slot] = COHORTS.index(cohort)
            self._version[slot] = self._intern(model_version)
            self._start[slot], self._count[slot] = start, count
            self._added += 1
            self._cells = start + count
        return Recommendation(
            str(recommendation_id), cohort, model_version, tuple(item_ids)
        )

    def get(self, recommendation_id: str) -> Recommendation | None:
        """Look a recommendation up.

        Args:
            recommendation_id: id from :meth:`add`.

        Returns:
            The recommendation, or ``None`` if unknown or no longer kept.
        """
        with self._lock:
            slot = self._slot(recommendation_id)
            if slot is None:
                return None
            cells = self._cells_of(slot)
            items = self._items[cells].tolist()
            shown = self._impressed[cells].tolist()
            return Recommendation(
                recommendation_id,
                COHORTS[self._cohort[slot]],
                self._versions[self._version[slot]],
                tuple(items),
                frozenset(
                    item for item, seen in zip(items, shown, strict=True) if seen
                ),
            )

    def record(
        self, recommendation_id: str, impressions: list[int], clicks: list[int]
    ) -> FeedbackOutcome:
        """Record feedback, counting each impression and click once.

        Args:
            recommendation_id: id from :meth:`add`.
            impressions: items shown.
            clicks: items clicked. Items not in the recommendation are
                ignored (the caller refuses them first) and not counted.

        Returns:
            What was new and what was a duplicate.

        Raises:
            KeyError: the recommendation is unknown or no longer kept.
        """
        with self._lock:
            slot = self._slot(recommendation_id)
            if slot is None:
                raise KeyError(recommendation_id)
            cells = self._cells_of(slot)
            position = {item: i for i, item in enumerate(self._items[cells].tolist())}
            impressed = _mark(self._impressed, cells, position, impressions)
            clicked = _mark(self._clicked, cells, position, clicks)
        known = sum(i in position for i in impressions) + sum(
            c in position for c in clicks
        )
        return FeedbackOutcome(impressed, clicked, known - impressed - clicked)

    def _slot(self, recommendation_id: str) -> int | None:
        """The slot still holding this id, or ``None``; call under the lock."""
        try:
            number = uuid.UUID(recommendation_id).int
        except (ValueError, TypeError, AttributeError):
            return None
        slot = number >> 96
        if slot >= min(self._added, self._capacity):
            return None
        if tuple(self._ids[slot].tolist()) != divmod(number, 2**64):
            return None  # a newer recommendation took the slot
        if self._start[slot] < self._cells - self._pool:
            return None  # newer recommendations took its item cells
        return slot

    def _cells_of(self, slot: int) -> np.ndarray:
        return self._cells_at(int(self._start[slot]), int(self._count[slot]))

    def _cells_at(self, start: int, count: int) -> np.ndarray:
        """``[count]`` pool indices of the cells from absolute cell ``start``."""
        return (start + np.arange(count)) % self._pool

    def _intern(self, model_version: str) -> int:
        index = self._version_index.get(model_version)
        if index is None:
            index = self._version_index[model_version] = len(self._versions)
            self._versions.append(model_version)
        return index


def _mark(
    seen: np.ndarray, cells: np.ndarray, position: dict[int, int], items: list[int]
) -> int:
    """Sets ``seen`` at the cells of ``items`` that ``position`` knows.

    Returns:
        How many cells were newly set.
    """
    new = 0
    for item in items:
        i = position.get(item)
        if i is not None and not seen[cells[i]]:
            seen[cells[i]] = True
            new += 1
    return new
