"""Replays the test period of the split against a running server."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.features import is_missing
from data.load import load_data
from data.locate import resolve_data
from data.split import split_interactions
from serving.replay import ReplayUser, replay


def replay_users(data: Path | None, mapping: Path | None = None) -> list[ReplayUser]:
    """Every user with test events: warm users by id, cold users by their side
    features, onboarding items, which of those they clicked and how they rated
    them (when every one has a rating); their test clicks are what they would
    click."""
    loaded = load_data(resolve_data(data), mapping)
    events = split_interactions(loaded.interactions)
    names = list(loaded.user_features)
    # A missing value is left out: the server reads an absent feature as unknown.
    features = {
        int(row["user_id"]): {n: str(row[n]) for n in names if not is_missing(row[n])}
        for row in loaded.users.to_dict("records")
    }
    users = []
    for user_id, frame in events.groupby("user_id"):
        test = frame[frame.split == "test"]
        if test.empty:
            continue
        cohort = str(test.cohort.iat[0])
        onboarding = frame[frame.split == "onboarding"]
        users.append(
            ReplayUser(
                user_id=int(user_id),
                cohort=cohort,
                features=features.get(int(user_id), {}) if cohort == "cold" else {},
                item_ids=[int(i) for i in onboarding.item_id],
                clicked=[bool(c) for c in onboarding.click],
                ratings=_ratings(onboarding.rating),
                test_clicks={int(i) for i in test.loc[test.click == 1, "item_id"]},
            )
        )
    return users


def _ratings(ratings: pd.Series) -> list[int]:
    """The onboarding ratings as ints, or none when any is missing (a log of
    clicks only); a request holds one per item or none."""
    if ratings.isna().any():
        return []
    return [int(round(r)) for r in ratings]


def replay_test_period(
    url: str, data: Path | None, mapping: Path | None = None, limit: int | None = None, k: int = 10
) -> dict:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: replay at least 1 user, or leave it out for all")
    if k < 1:
        raise ValueError(f"--k {k}: ask for at least 1 recommendation per user")
    users = replay_users(data, mapping)
    if limit is not None:
        users = users[:limit]
    summary = replay(url, users, k=k)
    return {
        "users": len(users),
        "errors": summary.errors,
        # The most frequent reasons, with how many requests each failed.
        "error_reasons": dict(summary.failures.most_common(5)),
        "impressions": summary.impressions,
        "clicks": summary.clicks,
        "ctr": summary.ctr,
        "cohorts": {
            name: {"users": c.users, "impressions": c.impressions, "clicks": c.clicks, "ctr": c.ctr}
            for name, c in summary.cohorts.items()
        },
    }
