"""Recent recommendations, kept so feedback can be matched and deduplicated."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field


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


@dataclass
class _Entry:
    recommendation: Recommendation
    impressed: set[int] = field(default_factory=set)
    clicked: set[int] = field(default_factory=set)


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
        recommendation = Recommendation(
            str(uuid.uuid4()), cohort, model_version, tuple(item_ids)
        )
        with self._lock:
            self._entries[recommendation.recommendation_id] = _Entry(recommendation)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return recommendation

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
            return entry.recommendation

    def record(
        self, recommendation_id: str, impressions: list[int], clicks: list[int]
    ) -> FeedbackOutcome:
        """Record feedback, counting each impression and click once.

        Args:
            recommendation_id: id from :meth:`add`.
            impressions: items shown.
            clicks: items clicked.

        Returns:
            What was new and what was a duplicate.

        Raises:
            KeyError: the recommendation is unknown or was evicted.
        """
        with self._lock:
            entry = self._entries[recommendation_id]
            self._entries.move_to_end(recommendation_id)
            new_impressions = set(impressions) - entry.impressed
            new_clicks = set(clicks) - entry.clicked
            entry.impressed |= new_impressions
            entry.clicked |= new_clicks
        duplicates = (
            len(impressions) - len(new_impressions) + len(clicks) - len(new_clicks)
        )
        return FeedbackOutcome(len(new_impressions), len(new_clicks), duplicates)
