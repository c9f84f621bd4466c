"""models.bundle: the load-time caches serve what the networks compute.

A bundle precomputes known users' teacher encodings and every candidate's
item-side work when it is loaded. These tests load the bundle of the session's
pipeline run and compare each cached path against the direct network call.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from data.examples import FEEDBACK_CLICK, FEEDBACK_UNKNOWN, feedback_codes
from data.split import split_interactions
from models.bundle import ColdUser, ModelBundle, load_bundle
from pipeline.ingest import read_ingested

# Batched and one-user teacher calls differ in float rounding only (measured
# below 1e-6); scores are probabilities compared with the same slack.
ATOL = 1e-5
SAMPLE_USERS = 60


@pytest.fixture(scope="module")
def bundle(pipeline_run) -> ModelBundle:
    config, _ = pipeline_run
    return load_bundle(config.work_dir / "bundle", "test")


def known_users(bundle: ModelBundle) -> list[int]:
    users = sorted(bundle._users)
    return random.Random(0).sample(users, min(SAMPLE_USERS, len(users)))


def cold_users(bundle: ModelBundle, count: int = 30) -> list[ColdUser]:
    """New users, every other one saying which of their items they clicked."""
    rng = random.Random(1)
    items = [int(i) for i in bundle.space.item_ids]
    features = [{}, {"gender": "F", "age": "31"}, {"occupation": "writer"}]
    users = []
    for n in range(count):
        touched = tuple(rng.sample(items, rng.randint(1, 8)))
        clicked = tuple(rng.random() < 0.5 for _ in touched) if n % 2 else None
        users.append(ColdUser(rng.choice(features), touched, clicked))
    return users


def assert_same_recommendations(cached, direct, what: str) -> None:
    """The same ranking up to float rounding: equal scores position by position,
    and items in another order only where their scores tie within ``ATOL``
    (the two paths batch the same sums differently)."""
    assert len(cached) == len(direct), what
    np.testing.assert_allclose(
        [s.score for s in cached], [s.score for s in direct], atol=ATOL, err_msg=what
    )
    direct_scores = {s.item_id: s.score for s in direct}
    for position, scored in enumerate(cached):
        if scored.item_id == direct[position].item_id:
            continue
        # A swap within a near-tie, or across the cut at k for the last items.
        expected = direct_scores.get(scored.item_id, direct[-1].score)
        assert abs(scored.score - expected) <= ATOL, (
            f"{what}: item {scored.item_id} at {position} scores {scored.score}, "
            f"the full network {expected}"
        )


def test_known_user_embeddings_match_the_teacher_network(bundle) -> None:
    users = known_users(bundle)
    cached = bundle.user_embeddings(users)
    one_by_one = np.concatenate([bundle.compute_user_embeddings([u]) for u in users])
    assert cached.shape == (len(users), bundle.embedding_dim)
    assert cached.dtype == np.float32
    np.testing.assert_allclose(cached, one_by_one, atol=ATOL, rtol=0)


def test_every_known_user_has_a_cached_embedding(bundle) -> None:
    users = sorted(bundle._users)
    cached = bundle.user_embeddings(users)
    batched = bundle.compute_user_embeddings(users)
    np.testing.assert_allclose(cached, batched, atol=ATOL, rtol=0)


def test_cached_embedding_is_a_copy_callers_may_change(bundle) -> None:
    user = known_users(bundle)[0]
    first = bundle.user_embeddings([user])
    first[:] = 0.0
    assert np.any(bundle.user_embeddings([user]) != 0.0)


def test_unknown_user_embedding_is_a_key_error(bundle) -> None:
    with pytest.raises(KeyError):
        bundle.user_embeddings([10**9])


@pytest.mark.parametrize("k", [1, 10, 100])
def test_warm_recommendations_match_the_full_network(bundle, k: int) -> None:
    for user in known_users(bundle):
        assert_same_recommendations(
            bundle.recommend_known(user, k),
            bundle.compute_recommend_known(user, k),
            f"user {user}, k={k}",
        )


def test_cold_recommendations_match_the_full_network(bundle) -> None:
    for user in cold_users(bundle):
        assert_same_recommendations(
            bundle.recommend_cold(user, 10),
            bundle.compute_recommend_cold(user, 10),
            f"cold user {user}",
        )


def test_a_new_users_clicks_change_their_embedding(bundle) -> None:
    items = tuple(int(i) for i in bundle.space.item_ids[:5])
    features = {"gender": "F"}
    liked, disliked, unknown = (
        bundle.cold_embeddings([ColdUser(features, items, clicked)])[0]
        for clicked in ((True,) * 5, (False,) * 5, None)
    )
    # The session's run trains the student a few steps only: the feedback
    # vectors have barely left zero, but a model ignoring clicks gives equality.
    assert np.abs(liked - disliked).max() > 0
    assert np.abs(liked - unknown).max() > 0


def test_a_new_users_ratings_say_more_than_their_clicks(bundle) -> None:
    items = tuple(int(i) for i in bundle.space.item_ids[:5])
    features = {"gender": "F"}
    loved, liked, clicked = (
        bundle.cold_embeddings([ColdUser(features, items, clicks, ratings)])[0]
        for clicks, ratings in (
            (None, (5,) * 5),
            (None, (4,) * 5),
            ((True,) * 5, None),
        )
    )
    assert np.abs(loved - liked).max() > 0, "two ratings, both clicks: apart"
    assert np.abs(liked - clicked).max() > 0, "a rating is not just its click"
    # With both, the ratings are read.
    both = bundle.cold_embeddings([ColdUser(features, items, (False,) * 5, (5,) * 5)])
    np.testing.assert_array_equal(both[0], loved)


def test_clicks_must_be_one_per_item() -> None:
    with pytest.raises(ValueError, match="clicked holds 1 values for 2 item_ids"):
        ColdUser({}, (1, 2), (True,))


@pytest.mark.parametrize("ratings", [(4,), (4, 6), (0, 3)])
def test_ratings_must_be_one_per_item_from_1_to_5(ratings) -> None:
    with pytest.raises(ValueError, match="ratings holds 1 values|from 1 to 5"):
        ColdUser({}, (1, 2), None, ratings)


def test_known_users_history_carries_how_each_item_was_rated(
    bundle, pipeline_run
) -> None:
    config, _ = pipeline_run
    interactions, *_ = read_ingested(config.work_dir)
    events = split_interactions(interactions)
    known = events[events.split.isin(["train", "valid"])]
    width = bundle.max_history
    for user in known_users(bundle)[:20]:
        mine = known[known.user_id == user].tail(width)
        batch = bundle._known_batch([user])
        n = int(batch.history_len[0])
        assert batch.history[0, :n].tolist() == bundle.space.item_index(
            mine.item_id
        ).tolist()
        codes = batch.history_feedback[0]
        expected = feedback_codes(mine.click.to_numpy(), mine.rating.to_numpy())
        assert codes[:n].tolist() == expected.tolist()
        assert (expected > FEEDBACK_CLICK).all(), "each MovieLens event has a rating"
        assert (codes[n:] == FEEDBACK_UNKNOWN).all()


def test_warm_recommendations_leave_out_seen_items(bundle) -> None:
    for user in known_users(bundle)[:10]:
        items = {s.item_id for s in bundle.recommend_known(user, 50)}
        assert not items & bundle.seen_items(user), f"user {user}"


def test_requests_never_run_the_item_tables_over_the_catalogue(
    bundle, monkeypatch
) -> None:
    """Item vectors of the whole catalogue come from the load-time cache."""
    sizes: list[int] = []
    for network in (bundle.teacher, bundle.student):
        original = network.item_vectors

        def spy(item_idx: torch.Tensor, original=original) -> torch.Tensor:
            sizes.append(item_idx.numel())
            return original(item_idx)

        monkeypatch.setattr(network, "item_vectors", spy)
    user = known_users(bundle)[0]
    bundle.user_embeddings([user])
    bundle.recommend_known(user, 10)
    assert sizes == [], "warm requests are served from the cache alone"
    bundle.recommend_cold(cold_users(bundle, 1)[0], 10)
    assert sizes == [bundle.max_history], "a cold request encodes its history only"


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("bundle.json", "not json", "bundle.json is not JSON"),
        ("bundle.json", "[]", "bundle.json holds no bundle description"),
        ("space.json", "[]", "space.json is not a feature space emarec wrote"),
        ("space.json", '{"bogus": 1}', "space.json is not a feature space"),
    ],
)
def test_a_damaged_bundle_file_is_named(pipeline_run, tmp_path, name, text, says):
    import shutil

    config, _ = pipeline_run
    copy = shutil.copytree(config.work_dir / "bundle", tmp_path / "bundle")
    (copy / name).write_text(text)
    with pytest.raises(ValueError, match=says):
        ModelBundle(copy)
