"""The one split every run and every tool uses, so that results compare.

Each user's events are ordered by timestamp, then item id. Cold users
(``user_id % 5 == 0``) give their first 5 events as onboarding context and the
rest as their test set. Every other user is warm and is split in that order into
train, valid and test, with ``n_test = n_valid = max(1, round(0.1 * n))``
(Python's ``round``, half to even) and the rest train.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLD_MODULUS = 5
ONBOARDING_EVENTS = 5


def is_cold(user_id: int | np.ndarray) -> bool | np.ndarray:
    return user_id % COLD_MODULUS == 0


def holdout_events(count: int) -> int:
    """Events a warm user of ``count`` events gives to valid, and as many to
    test; the rest, if any, are train (Python's ``round``: half to even)."""
    return max(1, round(0.1 * int(count)))


def split_interactions(interactions: pd.DataFrame) -> pd.DataFrame:
    """Assigns every event its cohort and split.

    Args:
        interactions: at least ``user_id``, ``item_id`` and ``timestamp``.

    Returns:
        The events in split order with added columns ``cohort`` ("warm" or
        "cold"), ``split`` ("train", "valid", "test" or "onboarding") and
        ``position`` (the event's index in its user's sequence).
    """
    events = interactions.sort_values(
        ["user_id", "timestamp", "item_id"], kind="stable"
    ).reset_index(drop=True)
    position = events.groupby("user_id").cumcount().to_numpy()
    count = events.groupby("user_id")["item_id"].transform("size").to_numpy()
    cold = is_cold(events["user_id"].to_numpy())

    n_holdout = {n: holdout_events(n) for n in np.unique(count)}
    holdout = np.array([n_holdout[n] for n in count], dtype=np.int64)
    n_train = count - 2 * holdout

    split = np.where(
        position < n_train, "train", np.where(position < n_train + holdout, "valid", "test")
    )
    split = np.where(cold, np.where(position < ONBOARDING_EVENTS, "onboarding", "test"), split)
    return events.assign(
        cohort=np.where(cold, "cold", "warm"), split=split, position=position
    )


def split_counts(events: pd.DataFrame) -> dict[str, int]:
    """Users and rows per cohort and split, for logs and tests."""
    counts = {
        f"{cohort}/users": int(frame.user_id.nunique())
        for cohort, frame in events.groupby("cohort")
    }
    for (cohort, split), frame in events.groupby(["cohort", "split"]):
        counts[f"{cohort}/{split}_rows"] = len(frame)
    return counts
