"""data.split: the one split, exactly on MovieLens-100K and as properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.movielens import load_movielens
from data.split import is_cold, split_counts, split_interactions


@pytest.fixture(scope="module")
def ml100k_events(ml100k_dir: Path) -> pd.DataFrame:
    return split_interactions(load_movielens(ml100k_dir).interactions)


def test_ml100k_split_counts_are_exact(ml100k_events: pd.DataFrame) -> None:
    assert split_counts(ml100k_events) == {
        "cold/users": 188,
        "cold/onboarding_rows": 940,
        "cold/test_rows": 18_068,
        "warm/users": 755,
        "warm/train_rows": 64_816,
        "warm/valid_rows": 8_088,
        "warm/test_rows": 8_088,
    }


def test_ml100k_split_keeps_all_rows(ml100k_events: pd.DataFrame) -> None:
    assert len(ml100k_events) == 100_000
    cold = ml100k_events[ml100k_events.cohort == "cold"]
    assert (cold.user_id % 5 == 0).all()
    assert set(cold.split) == {"onboarding", "test"}
    warm = ml100k_events[ml100k_events.cohort == "warm"]
    assert (warm.user_id % 5 != 0).all()
    assert set(warm.split) == {"train", "valid", "test"}


# --- properties on a synthetic log -------------------------------------------------


def synthetic_log(seed: int = 0) -> pd.DataFrame:
    """Users 1..40 with 1..60 events, many sharing a timestamp, shuffled."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, 41):
        n = int(rng.integers(1, 61))
        items = rng.choice(np.arange(1, 500), size=n, replace=False)
        times = rng.integers(0, max(2, n // 3), size=n)  # ties on purpose
        rows += [(user, int(i), int(t)) for i, t in zip(items, times)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["click"] = (frame.item_id % 2).astype("int8")
    frame = frame.sample(frac=1.0, random_state=seed)
    frame.index = rng.permutation(len(frame)) + 1000  # an index that means nothing
    return frame


def log_of_counts(counts: dict[int, int]) -> pd.DataFrame:
    """``counts[user]`` events for each user, timestamps 0..n-1 in reverse order."""
    rows = [
        (user, item, n - item) for user, n in counts.items() for item in range(1, n + 1)
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def test_events_are_ordered_by_timestamp_then_item_id() -> None:
    log = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 2],
            "item_id": [7, 3, 9, 5, 1, 2],
            "timestamp": [100, 100, 50, 100, 9, 8],
        }
    )
    events = split_interactions(log)
    user1 = events[events.user_id == 1]
    assert user1.item_id.tolist() == [9, 3, 5, 7], "ties on time go by item id"
    assert user1.position.tolist() == [0, 1, 2, 3]
    assert events[events.user_id == 2].item_id.tolist() == [2, 1]


def test_every_user_sequence_is_sorted_and_contiguous() -> None:
    events = split_interactions(synthetic_log())
    assert events.index.tolist() == list(range(len(events)))
    for _, user in events.groupby("user_id", sort=False):
        keys = list(zip(user.timestamp, user.item_id))
        assert keys == sorted(keys)
        assert user.position.tolist() == list(range(len(user)))
        # one user's rows are one block
        assert user.index.tolist() == list(range(user.index[0], user.index[-1] + 1))


def test_cold_users_are_those_with_id_divisible_by_5() -> None:
    events = split_interactions(synthetic_log())
    by_user = events.groupby("user_id").cohort.agg(set)
    for user, cohorts in by_user.items():
        assert cohorts == ({"cold"} if user % 5 == 0 else {"warm"}), user
    assert is_cold(10) and is_cold(0) and not is_cold(11)
    assert is_cold(np.array([5, 6])).tolist() == [True, False]


@pytest.mark.parametrize(
    ("n", "holdout"),
    [
        (2, 1),
        (3, 1),  # round(0.3) = 0, then max(1, 0)
        (5, 1),  # round(0.5) = 0 (half to even), then max(1, 0)
        (10, 1),
        (14, 1),
        (15, 2),  # round(1.5) = 2
        (16, 2),
        (24, 2),
        (25, 2),  # round(2.5) = 2, half to even
        (26, 3),
        (45, 4),  # round(4.5) = 4
        (100, 10),
    ],
)
def test_warm_holdout_size_rounds_half_to_even(n: int, holdout: int) -> None:
    events = split_interactions(log_of_counts({1: n}))
    splits = events.split.tolist()
    expected = ["train"] * (n - 2 * holdout) + ["valid"] * holdout + ["test"] * holdout
    assert splits == expected


def test_warm_splits_follow_the_event_order() -> None:
    events = split_interactions(log_of_counts({1: 12}))
    # timestamps run backwards over item ids: the last items are the oldest
    assert events.item_id.tolist() == list(range(12, 0, -1))
    assert events.split.tolist()[-2:] == ["valid", "test"]


@pytest.mark.parametrize("n", [3, 5, 6, 30])
def test_cold_user_gives_first_5_events_as_onboarding(n: int) -> None:
    events = split_interactions(log_of_counts({5: n}))
    onboarding = min(n, 5)
    assert events.split.tolist() == ["onboarding"] * onboarding + ["test"] * (
        n - onboarding
    )
    assert set(events.cohort) == {"cold"}


def test_every_row_lands_in_exactly_one_split() -> None:
    log = synthetic_log(seed=3)
    events = split_interactions(log)
    key = ["user_id", "item_id", "timestamp"]
    assert len(events) == len(log)
    merged = log[key].merge(events[[*key, "split"]], on=key, how="left")
    assert len(merged) == len(log), "no row appears twice"
    assert merged.split.notna().all(), "no row is lost"
    warm = events.cohort == "warm"
    assert set(events.split[warm]) <= {"train", "valid", "test"}
    assert set(events.split[~warm]) <= {"onboarding", "test"}


def test_split_does_not_modify_its_input() -> None:
    log = synthetic_log(seed=4)
    before = log.copy()
    split_interactions(log)
    pd.testing.assert_frame_equal(log, before)


def test_split_counts_add_up() -> None:
    events = split_interactions(synthetic_log(seed=5))
    counts = split_counts(events)
    rows = sum(v for k, v in counts.items() if k.endswith("_rows"))
    assert rows == len(events)
    assert counts["cold/users"] + counts["warm/users"] == events.user_id.nunique()
