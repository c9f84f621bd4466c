"""Ranking metrics on hand-made scores: per-user figures, their means and the
standard error of the mean over users."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest

from data.examples import RankingUser
from pipeline.evaluate import (
    ranking_metrics,
    shared_ranking_bound,
    standard_error,
    user_ranking,
)


def user(seen: set[int], relevant: set[int]) -> RankingUser:
    return RankingUser(
        user_id=1, cohort="cold", user_idx=0, user_feats=[], history=[],
        history_feedback=[], seen=seen, relevant=relevant,
    )  # fmt: skip


def test_user_ranking_excludes_seen_items_and_padding():
    # Item 0 (padding) and the seen item 1 score highest but are never ranked.
    scores = np.array([[9.0, 8.0, 7.0, 1.0, 6.0], [9.0, 8.0, 1.0, 7.0, 6.0]])
    users = [user(seen={1}, relevant={2, 4}), user(seen={1}, relevant={2})]
    recalls, ndcgs = user_ranking(scores, users, k=2)
    # First user: top 2 are items 2 and 4, both relevant. Second: 3 and 4, no hit.
    np.testing.assert_allclose(recalls, [1.0, 0.0])
    np.testing.assert_allclose(ndcgs, [1.0, 0.0])
    metrics = ranking_metrics(recalls, ndcgs, k=2)
    assert metrics["recall_at_2"] == pytest.approx(0.5)
    # Sample std of (1, 0) is sqrt(0.5); over sqrt(2) users: 0.5.
    assert metrics["recall_at_2_se"] == pytest.approx(0.5)


def test_standard_error_needs_two_users():
    assert np.isnan(standard_error(np.array([0.3])))
    assert standard_error(np.array([0.2, 0.2, 0.2])) == pytest.approx(0.0, abs=1e-12)


def test_no_shared_ranking_beats_the_test_click_bound():
    # Users who have seen nothing: every ranking shared by all of them is
    # tried, and none ranks better than the one fitted on their test clicks.
    rng = np.random.default_rng(0)
    items = 7  # 0 is the padding item
    users = [
        user(seen=set(), relevant=set(rng.choice(range(1, items), rng.integers(1, 5))))
        for _ in range(12)
    ]
    k = 2
    bound = user_ranking(shared_ranking_bound(users, items, k), users, k)[0].mean()
    best = 0.0
    for order in permutations(range(1, items), k):
        scores = np.zeros(items)
        scores[list(order)] = [2.0, 1.0]
        shared = np.tile(scores, (len(users), 1))
        best = max(best, user_ranking(shared, users, k)[0].mean())
    assert bound == pytest.approx(best)
    # An item is worth its share of each user's Recall@K: relevant to one
    # user with one test click, it outranks one relevant to two users with five.
    five = {2, 3, 4, 5, 6}
    pair = [user(set(), {1}), user(set(), five), user(set(), five)]
    worth = shared_ranking_bound(pair, items, k=5)[0]
    assert worth[1] == pytest.approx(1.0) and worth[2] == pytest.approx(0.4)
