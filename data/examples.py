"""Model inputs built from split events, with histories that never see the future.

An event's history is the last ``max_history`` events of its user that came
strictly before it and that the model may know at that time: inside train (or
onboarding) the events before it; for valid, test and cold-test events, the
events of the earlier splits only (train for valid; train and valid for warm
test; onboarding for cold test).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from data.features import FeatureSpace
from data.schema import CLICK_THRESHOLD

SEQUENTIAL_SPLITS = ("train", "onboarding")
# What a history entry says of the user's reaction to its item: nothing
# (also the padding), a click or not, or the 1-5 rating itself (code
# FEEDBACK_RATING_BASE + rating), which says more than the click it implies.
FEEDBACK_UNKNOWN, FEEDBACK_NO_CLICK, FEEDBACK_CLICK = 0, 1, 2
FEEDBACK_RATING_BASE = 2
FEEDBACK_CODES = 3  # unknown and the two click codes
FEEDBACK_CODES_WITH_RATINGS = FEEDBACK_RATING_BASE + 5 + 1
# The click code each code implies: a rating code reads as the click it is.
CLICK_OF_CODE = np.array(
    [FEEDBACK_UNKNOWN, FEEDBACK_NO_CLICK, FEEDBACK_CLICK]
    + [
        FEEDBACK_CLICK if rating >= CLICK_THRESHOLD else FEEDBACK_NO_CLICK
        for rating in range(1, 6)
    ]
)


def feedback_codes(click, rating=None) -> np.ndarray:
    """History feedback codes of logged events.

    Args:
        click: their click labels.
        rating: their 1-5 ratings, NaN (or None) where an event has none;
            an event with a rating gets its rating code, one without its
            click code.
    """
    codes = np.where(np.asarray(click) > 0, FEEDBACK_CLICK, FEEDBACK_NO_CLICK)
    if rating is None:
        return codes
    rating = np.asarray(rating, dtype=np.float64)
    # A half star reads as the whole star below it, the side of the click
    # threshold its label is on (3.5: no click, like a 3); rounding would
    # make a 3.5 read as a 4, a click its label is not.
    rating_codes = FEEDBACK_RATING_BASE + np.floor(np.nan_to_num(rating))
    return np.where(np.isfinite(rating), rating_codes, codes).astype(np.int64)


def clicks_only(codes: np.ndarray) -> np.ndarray:
    """The codes with each rating reduced to the click it implies."""
    return CLICK_OF_CODE[np.asarray(codes)]


@dataclass
class Examples:
    """A batch-able set of examples; every field has the same first dimension.

    Attributes:
        user_id: raw user ids, for grouping.
        user_idx: index into the user-id table (0 for users without one).
        user_feats: ``[N, F]`` token index per user side feature.
        item_idx: the candidate item's index.
        history: ``[N, L]`` item indices, left-aligned, 0 past ``history_len``.
        history_len: ``[N]`` valid history entries.
        history_feedback: ``[N, L]`` the user's reaction to each history item
            (``FEEDBACK_CLICK``, ``FEEDBACK_NO_CLICK``; ``FEEDBACK_UNKNOWN`` as
            padding and where it is not known; with a rating, the rating's
            code, see :func:`feedback_codes`).
        feedback: the code this event has as a history entry of later events.
        label: click (1) or not (0), float32.
        rated: 1 for a logged interaction, 0 for a sampled unseen item.
    """

    user_id: np.ndarray
    user_idx: np.ndarray
    user_feats: np.ndarray
    item_idx: np.ndarray
    history: np.ndarray
    history_len: np.ndarray
    history_feedback: np.ndarray
    feedback: np.ndarray
    label: np.ndarray
    rated: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def take(self, index: np.ndarray) -> "Examples":
        return Examples(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(parts: list["Examples"]) -> "Examples":
        return Examples(
            **{
                f.name: np.concatenate([getattr(p, f.name) for p in parts])
                for f in fields(Examples)
            }
        )


def history_windows(events: pd.DataFrame, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Global row indices of each event's history.

    Args:
        events: the output of ``split_interactions`` (sorted by user, then order).

    Returns:
        ``[N, L]`` row indices into ``events`` (-1 for padding) and ``[N]`` lengths.
    """
    position = events["position"].to_numpy()
    user_start = np.arange(len(events)) - position
    split_start = events.groupby(["user_id", "split"])["position"].transform("min")
    sequential = events["split"].isin(SEQUENTIAL_SPLITS).to_numpy()
    context_end = np.where(sequential, position, split_start.to_numpy())

    length = np.minimum(context_end, max_history)
    offsets = np.arange(max_history)[None, :]
    local = (context_end - length)[:, None] + offsets
    rows = np.where(offsets < length[:, None], user_start[:, None] + local, -1)
    return rows, length


def build_examples(
    events: pd.DataFrame,
    space: FeatureSpace,
    user_tokens: dict[int, list[int]],
    max_history: int,
) -> Examples:
    """Encodes every event as an example (the caller selects splits after)."""
    rows, length = history_windows(events, max_history)
    item_idx = space.item_index(events["item_id"])
    history = np.where(rows >= 0, item_idx[np.maximum(rows, 0)], 0)
    ratings = events["rating"].to_numpy() if "rating" in events else None
    codes = feedback_codes(events["click"].to_numpy(), ratings)
    feedback = np.where(rows >= 0, codes[np.maximum(rows, 0)], FEEDBACK_UNKNOWN)
    user_id = events["user_id"].to_numpy()
    n_features = len(space.user_features)
    default = [0] * n_features
    feats = np.array([user_tokens.get(int(u), default) for u in user_id], np.int64)
    return Examples(
        user_id=user_id.astype(np.int64),
        user_idx=space.user_index(user_id),
        user_feats=feats.reshape(len(events), n_features),
        item_idx=item_idx,
        history=history.astype(np.int64),
        history_len=length.astype(np.int64),
        history_feedback=feedback.astype(np.int64),
        feedback=codes,
        label=events["click"].to_numpy().astype(np.float32),
        rated=np.ones(len(events), np.float32),
    )


def sample_negatives(
    examples: Examples,
    num_items: int,
    seen: dict[int, set[int]],
    per_example: int,
    rng: np.random.Generator,
    probabilities: np.ndarray | None = None,
) -> Examples:
    """Pairs each example with unseen items as non-interactions, sharing its history.

    Items the user has already seen are re-drawn once; the rare collision left
    after that is kept (it costs a little label noise, not a bias).

    Args:
        probabilities: each item index's chance to be drawn, ``[num_items]``
            (0 for the padding item 0); uniform over the items if None.
    """
    if per_example == 0:
        return examples.take(np.arange(0))
    repeated = examples.take(np.repeat(np.arange(len(examples)), per_example))

    def draw(size):
        if probabilities is None:
            return rng.integers(1, num_items, size=size)
        return rng.choice(num_items, size=size, p=probabilities)

    items = draw(len(repeated))
    again = [
        i
        for i, (user, item) in enumerate(zip(repeated.user_id, items))
        if item in seen.get(int(user), ())
    ]
    if again:  # in one draw: a weighted draw costs a pass over the catalogue
        items[again] = draw(len(again))
    repeated.item_idx = items.astype(np.int64)
    repeated.feedback = np.full(len(repeated), FEEDBACK_UNKNOWN, np.int64)
    repeated.label = np.zeros(len(repeated), np.float32)
    repeated.rated = np.zeros(len(repeated), np.float32)
    return repeated


@dataclass
class RankingUser:
    """One user's ranking task: their context, what to exclude and what is relevant."""

    user_id: int
    cohort: str
    user_idx: int
    user_feats: list[int]
    history: list[int]
    history_feedback: list[int]
    seen: set[int]
    relevant: set[int]


def ranking_users(events: pd.DataFrame, examples: Examples) -> list[RankingUser]:
    """Test users with at least one test click, with their test-time context.

    Seen items are those in train (warm) or onboarding (cold), as item indices.
    """
    result = []
    split = events["split"].to_numpy()
    for user_id, rows in events.groupby("user_id").indices.items():
        test_rows = rows[split[rows] == "test"]
        clicks = test_rows[examples.label[test_rows] == 1]
        if len(clicks) == 0:
            continue
        seen_rows = rows[np.isin(split[rows], SEQUENTIAL_SPLITS)]
        first = test_rows[0]
        n = examples.history_len[first]
        result.append(
            RankingUser(
                user_id=int(user_id),
                cohort=str(events["cohort"].iat[first]),
                user_idx=int(examples.user_idx[first]),
                user_feats=examples.user_feats[first].tolist(),
                history=examples.history[first, :n].tolist(),
                history_feedback=examples.history_feedback[first, :n].tolist(),
                seen=set(examples.item_idx[seen_rows].tolist()),
                relevant=set(examples.item_idx[clicks].tolist()),
            )
        )
    return result
