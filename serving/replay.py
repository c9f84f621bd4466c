"""Replay held-out users against a running server and measure online CTR."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from tqdm import tqdm

logger = logging.getLogger(__name__)

Cohort = Literal["warm", "cold"]


@dataclass(frozen=True)
class ReplayUser:
    """One user to replay.

    Attributes:
        user_id: the user's id; only sent for the warm cohort.
        cohort: ``warm`` (known to the model) or ``cold`` (new).
        features: side features, sent for cold users.
        item_ids: onboarding items of a cold user; empty for warm users.
        test_clicks: held-out items that count as clicks when recommended.
        clicked: whether the cold user clicked each onboarding item; empty
            when not known (the request then leaves ``clicked`` out).
        ratings: the cold user's 1-5 rating of each onboarding item; empty
            when not known (the request then leaves ``ratings`` out).
    """

    user_id: int
    cohort: Cohort
    features: dict[str, str] = field(default_factory=dict)
    item_ids: list[int] = field(default_factory=list)
    test_clicks: set[int] = field(default_factory=set)
    clicked: list[bool] = field(default_factory=list)
    ratings: list[int] = field(default_factory=list)


@dataclass
class CohortReplay:
    """Replay totals of one cohort.

    Attributes:
        users: users whose recommendation and feedback both succeeded.
        impressions: recommended items shown.
        clicks: recommended items that were in the user's test clicks.
    """

    users: int = 0
    impressions: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        """Clicks per impression; 0 with no impressions."""
        return self.clicks / self.impressions if self.impressions else 0.0


@dataclass
class ReplaySummary:
    """Replay totals per cohort and the failed requests.

    Attributes:
        cohorts: totals by cohort, both cohorts always present.
        errors: requests that failed (non-2xx or no response).
        failures: how many failed for each reason (the path and the status
            with the server's answer, or the connection error).
    """

    cohorts: dict[str, CohortReplay] = field(
        default_factory=lambda: {"warm": CohortReplay(), "cold": CohortReplay()}
    )
    errors: int = 0
    failures: Counter = field(default_factory=Counter)

    def fail(self, reason: str) -> None:
        self.errors += 1
        self.failures[reason[:300]] += 1

    @property
    def impressions(self) -> int:
        """Impressions over both cohorts."""
        return sum(c.impressions for c in self.cohorts.values())

    @property
    def clicks(self) -> int:
        """Clicks over both cohorts."""
        return sum(c.clicks for c in self.cohorts.values())

    @property
    def ctr(self) -> float:
        """Clicks per impression over both cohorts; 0 with no impressions."""
        return self.clicks / self.impressions if self.impressions else 0.0


def replay(
    url: str, requests: Iterable[ReplayUser], k: int = 10, timeout_s: float = 30
) -> ReplaySummary:
    """Ask for recommendations per user and send back the simulated feedback.

    Every recommended item counts as shown; those among the user's
    ``test_clicks`` count as clicked.

    Args:
        url: base URL of the server, e.g. ``http://127.0.0.1:8000``.
        requests: users to replay.
        k: recommendations per user.
        timeout_s: per-request timeout.

    Returns:
        Impressions, clicks and CTR per cohort, and the number of errors.
    """
    summary = ReplaySummary()
    total = len(requests) if isinstance(requests, Sized) else None
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for user in tqdm(requests, total=total, desc="replay", unit="user"):
            _replay_user(client, user, k, summary)
    logger.info(
        "replayed %d users: warm ctr %.4f, cold ctr %.4f, %d errors",
        sum(c.users for c in summary.cohorts.values()),
        summary.cohorts["warm"].ctr,
        summary.cohorts["cold"].ctr,
        summary.errors,
    )
    for reason, count in summary.failures.most_common(3):
        logger.warning("%d failed requests: %s", count, reason)
    return summary


def _replay_user(
    client: httpx.Client, user: ReplayUser, k: int, summary: ReplaySummary
) -> None:
    recommendation = _post(client, "/v1/recommendations", _request(user, k), summary)
    if recommendation is None:
        return
    shown = [item["item_id"] for item in recommendation["items"]]
    clicks = [item_id for item_id in shown if item_id in user.test_clicks]
    body = {
        "recommendation_id": recommendation["recommendation_id"],
        "impressions": None,
        "clicks": clicks,
    }
    if _post(client, "/v1/feedback", body, summary) is None:
        return
    totals = summary.cohorts[user.cohort]
    totals.users += 1
    totals.impressions += len(shown)
    totals.clicks += len(clicks)


def _request(user: ReplayUser, k: int) -> dict[str, Any]:
    if user.cohort == "warm":
        return {"user_id": user.user_id, "k": k}
    body = {"features": user.features, "item_ids": list(user.item_ids), "k": k}
    if user.clicked:
        body["clicked"] = list(user.clicked)
    if user.ratings:
        body["ratings"] = list(user.ratings)
    return body


def _post(
    client: httpx.Client, path: str, body: dict[str, Any], summary: ReplaySummary
) -> dict[str, Any] | None:
    """POST and decode; counts a failure and returns ``None`` on error."""
    try:
        response = client.post(path, json=body)
    except httpx.HTTPError as exc:
        summary.fail(f"POST {path}: {type(exc).__name__}: {exc}")
        return None
    if not response.is_success:
        summary.fail(f"POST {path}: {response.status_code} {response.text}")
        return None
    return response.json()
