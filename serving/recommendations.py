"""Recent recommendations, kept so feedback can be matched and deduplicated."""

from __future__ import annotations

import threading
import uuid
from array import array
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Recommendation:
    """What was recommended, to whom and by which model.

    Attributes:
        recommendation_id: id handed to the client.
        cohort: ``warm`` or ``cold``.
        model_version: version of the model that produced it.
        item_ids: recommended items, best first.
    """

    recommendation_id: str
    cohort: str
    model_version: str
    item_ids: tuple[int, ...]


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


class _Entry:
    """One logged recommendation, compact: 100,000 of them are kept by default.

    Items are a machine-int array; what was shown and clicked are bitmasks
    over the items' positions, rather than two Python sets (about 1.5 KB an
    entry against about 0.4 KB).
    """

    __slots__ = ("cohort", "model_version", "items", "impressed", "clicked")

    def __init__(self, cohort: str, model_version: str, item_ids: list[int]) -> None:
        self.cohort = cohort
        self.model_version = model_version
        self.items = array("q", item_ids)
        self.impressed = 0
        self.clicked = 0

    def recommendation(self, recommendation_id: str) -> Recommendation:
        return Recommendation(
            recommendation_id, self.cohort, self.model_version, tuple(self.items)
        )

    def mask(self, item_ids: set[int]) -> int:
        """Bits of the positions of ``item_ids``; ids not recommended are left out."""
        bits = 0
        for position, item in enumerate(self.items):
            if item in item_ids:
                bits |= 1 << position
        return bits


class RecommendationLog:
    """A thread-safe LRU of the last ``capacity`` recommendations."""

    def __init__(self, capacity: int) -> None:
        """Create an empty log.

        Args:
            capacity: recommendations kept; the least recently used go first.

        Raises:
            ValueError: capacity below 1.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """How many recommendations are kept."""
        return self._capacity

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(
        self, cohort: str, model_version: str, item_ids: list[int]
    ) -> Recommendation:
        """Remember a new recommendation under a fresh id.

        Args:
            cohort: ``warm`` or ``cold``.
            model_version: version of the model that produced it.
            item_ids: recommended items, best first.

        Returns:
            The stored recommendation with its new id.
        """
        recommendation_id = str(uuid.uuid4())
        entry = _Entry(cohort, model_version, item_ids)
        with self._lock:
            self._entries[recommendation_id] = entry
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return entry.recommendation(recommendation_id)

    def get(self, recommendation_id: str) -> Recommendation | None:
        """Look a recommendation up and mark it recently used.

        Args:
            recommendation_id: id from :meth:`add`.

        Returns:
            The recommendation, or ``None`` if unknown or evicted.
        """
        with self._lock:
            entry = self._entries.get(recommendation_id)
            if entry is None:
                return None
            self._entries.move_to_end(recommendation_id)
        return entry.recommendation(recommendation_id)

    def record(
        self, recommendation_id: str, impressions: list[int], clicks: list[int]
    ) -> FeedbackOutcome:
        """Record feedback, counting each impression and click once.

        Args:
            recommendation_id: id from :meth:`add`.
            impressions: items shown.
            clicks: items clicked. Items not in the recommendation are
                ignored; the caller refuses them first.

        Returns:
            What was new and what was a duplicate.

        Raises:
            KeyError: the recommendation is unknown or was evicted.
        """
        with self._lock:
            entry = self._entries[recommendation_id]
            self._entries.move_to_end(recommendation_id)
            shown, clicked = entry.mask(set(impressions)), entry.mask(set(clicks))
            new_impressions = (shown & ~entry.impressed).bit_count()
            new_clicks = (clicked & ~entry.clicked).bit_count()
            entry.impressed |= shown
            entry.clicked |= clicked
        duplicates = len(impressions) - new_impressions + len(clicks) - new_clicks
        return FeedbackOutcome(new_impressions, new_clicks, duplicates)
