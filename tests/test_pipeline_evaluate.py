"""Ranking metrics on hand-made scores: per-user figures, their means and the
standard error of the mean over users."""

from __future__ import annotations

import numpy as np
import pytest

from data.examples import RankingUser
from pipeline.evaluate import ranking_metrics, standard_error, user_ranking


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
