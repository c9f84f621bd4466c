"""data.examples and data.features: histories, negatives, ranking, vocabularies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.examples import (
    FEEDBACK_CLICK,
    FEEDBACK_NO_CLICK,
    FEEDBACK_RATING_BASE,
    FEEDBACK_UNKNOWN,
    build_examples,
    clicks_only,
    feedback_codes,
    history_windows,
    ranking_users,
    sample_negatives,
)
from data.features import UNKNOWN, FeatureSpace, age_bucket, zip_prefix
from data.split import split_interactions

USER_FEATURES = {
    "age": "age_bucket",
    "gender": "categorical",
    "occupation": "categorical",
    "zip": "zip_prefix",
}
N_ITEMS = 40


def make_tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A log of users 1..30 (6 of them cold) over items 101..140, and tables."""
    rng = np.random.default_rng(seed)
    item_ids = np.arange(101, 101 + N_ITEMS)
    rows = []
    for user in range(1, 31):
        n = int(rng.integers(1, 26))
        items = rng.choice(item_ids, size=n, replace=False)
        times = np.sort(rng.integers(0, 1000, size=n))
        clicks = rng.integers(0, 2, size=n)
        rows += [
            (user, int(i), int(t), int(c)) for i, t, c in zip(items, times, clicks)
        ]
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "click"])
    genres = ["drama", "comedy", "horror"]
    users = pd.DataFrame(
        {
            "user_id": range(1, 31),
            "age": [str(15 + 2 * u) for u in range(1, 31)],
            "gender": ["F" if u % 2 else "M" for u in range(1, 31)],
            "occupation": [["writer", "doctor", "other"][u % 3] for u in range(1, 31)],
            "zip": [f"{u % 10}1234" if u % 4 else "T8H1N" for u in range(1, 31)],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "title": [f"film {i}" for i in item_ids],
            "genres": [
                [genres[i % 3]] + ([genres[(i + 1) % 3]] if i % 2 else [])
                for i in item_ids
            ],
        }
    )
    return log, users, items


@pytest.fixture(scope="module")
def world():
    log, users, items = make_tables()
    events = split_interactions(log)
    warm = sorted(set(events.user_id[events.cohort == "warm"]))
    space = FeatureSpace.build(users, items, USER_FEATURES, ["genres"], warm)
    tokens = space.encode_users(users)
    return events, space, tokens, users, items


def item_index(items: pd.DataFrame) -> dict[int, int]:
    """Item id -> table row, worked out here rather than by FeatureSpace."""
    return {int(i): n + 1 for n, i in enumerate(items.item_id)}


def expected_contexts(events: pd.DataFrame, column: str = "item_id") -> list[list[int]]:
    """Per event, in row order, the ``column`` values (item ids by default) of
    the events the model may know before it."""
    allowed = {
        ("warm", "train"): {"train"},
        ("cold", "onboarding"): {"onboarding"},
        ("warm", "valid"): {"train"},
        ("warm", "test"): {"train", "valid"},
        ("cold", "test"): {"onboarding"},
    }
    result = []
    for _, user in events.groupby("user_id", sort=True):
        earlier: list[tuple[str, int]] = []
        for split, cohort, value in zip(user.split, user.cohort, user[column]):
            known = allowed[(cohort, split)]
            result.append([i for s, i in earlier if s in known])
            earlier.append((split, int(value)))
    return result


def test_log_has_every_split(world) -> None:
    events = world[0]
    assert set(events.split) == {"train", "valid", "test", "onboarding"}
    assert (events.groupby("user_id").size() > 8).sum() > 5, "long histories too"


@pytest.mark.parametrize("max_history", [3, 8])
def test_history_is_the_last_events_the_model_may_know(world, max_history) -> None:
    events, space, tokens, _, items = world
    index = item_index(items)
    examples = build_examples(events, space, tokens, max_history)
    checked = {"train": 0, "valid": 0, "test": 0, "onboarding": 0}
    contexts = expected_contexts(events)
    for row, (split, context) in enumerate(zip(events.split, contexts)):
        context = context[-max_history:]
        n = examples.history_len[row]
        assert n == len(context), (row, context)
        assert examples.history[row, :n].tolist() == [index[i] for i in context]
        assert (examples.history[row, n:] == 0).all(), "padding past history_len"
        checked[split] += 1
    assert min(checked.values()) > 0, checked


def test_history_feedback_is_whether_each_history_event_was_a_click(world) -> None:
    events, space, tokens, _, _ = world
    examples = build_examples(events, space, tokens, max_history=4)
    codes = {0: FEEDBACK_NO_CLICK, 1: FEEDBACK_CLICK}
    for row, clicks in enumerate(expected_contexts(events, "click")):
        n = examples.history_len[row]
        expected = [codes[c] for c in clicks[-4:]]
        assert examples.history_feedback[row, :n].tolist() == expected, row
        assert (examples.history_feedback[row, n:] == FEEDBACK_UNKNOWN).all()
    used = set(np.unique(examples.history_feedback).tolist())
    assert used == {FEEDBACK_UNKNOWN, FEEDBACK_NO_CLICK, FEEDBACK_CLICK}


def test_history_feedback_is_the_rating_where_an_event_has_one(world) -> None:
    events, space, tokens, _, _ = world
    rng = np.random.default_rng(3)
    events = events.copy()
    rating = np.where(events.click == 1, rng.integers(4, 6, len(events)), 0)
    rating = np.where(events.click == 0, rng.integers(1, 4, len(events)), rating)
    events["rating"] = np.where(rng.random(len(events)) < 0.3, np.nan, rating)
    click_code = np.where(events.click == 1, FEEDBACK_CLICK, FEEDBACK_NO_CLICK)
    events["code"] = np.where(
        events.rating.isna(), click_code, FEEDBACK_RATING_BASE + events.rating.fillna(0)
    ).astype(int)
    examples = build_examples(events, space, tokens, max_history=4)
    assert examples.feedback.tolist() == events.code.tolist()
    for row, codes in enumerate(expected_contexts(events, "code")):
        n = examples.history_len[row]
        assert examples.history_feedback[row, :n].tolist() == codes[-4:], row
    used = set(np.unique(examples.history_feedback).tolist())
    ratings = {FEEDBACK_RATING_BASE + r for r in range(1, 6)}
    assert used == {FEEDBACK_UNKNOWN, FEEDBACK_NO_CLICK, FEEDBACK_CLICK} | ratings
    # Reduced to clicks, a rating is the click it implies (4 and up).
    reduced = clicks_only(examples.history_feedback)
    assert set(np.unique(reduced).tolist()) == {
        FEEDBACK_UNKNOWN, FEEDBACK_NO_CLICK, FEEDBACK_CLICK
    }  # fmt: skip
    rated = examples.history_feedback > FEEDBACK_CLICK
    liked = examples.history_feedback >= FEEDBACK_RATING_BASE + 4
    assert (reduced[rated & liked] == FEEDBACK_CLICK).all()
    assert (reduced[rated & ~liked] == FEEDBACK_NO_CLICK).all()


def test_history_never_holds_the_event_or_later_ones(world) -> None:
    events = world[0]
    rows, length = history_windows(events, max_history=6)
    user = events.user_id.to_numpy()
    split = events.split.to_numpy()
    for r in range(len(events)):
        window = rows[r, : length[r]]
        assert (rows[r, length[r] :] == -1).all()
        assert (window < r).all(), f"row {r} sees itself or the future: {window}"
        assert (user[window] == user[r]).all()
        assert not np.isin(split[window], ["test"]).any(), "no test event is history"
        if split[r] == "valid":
            assert (split[window] == "train").all()


def test_warm_valid_history_is_the_last_train_events(world) -> None:
    events, space, tokens, _, items = world
    index = item_index(items)
    examples = build_examples(events, space, tokens, max_history=4)
    valid_rows = np.flatnonzero(events.split.to_numpy() == "valid")
    assert len(valid_rows) > 0
    for row in valid_rows:
        user_events = events[events.user_id == events.user_id.iat[row]]
        train = user_events[user_events.split == "train"].item_id.tolist()
        n = examples.history_len[row]
        assert examples.history[row, :n].tolist() == [index[i] for i in train[-4:]]


def test_warm_test_history_is_the_last_train_and_valid_events(world) -> None:
    events, space, tokens, _, items = world
    index = item_index(items)
    examples = build_examples(events, space, tokens, max_history=4)
    warm_test = np.flatnonzero(
        (events.split.to_numpy() == "test") & (events.cohort.to_numpy() == "warm")
    )
    for row in warm_test:
        user_events = events[events.user_id == events.user_id.iat[row]]
        known = user_events[user_events.split.isin(["train", "valid"])]
        expected = [index[i] for i in known.item_id.tolist()[-4:]]
        assert examples.history[row, : examples.history_len[row]].tolist() == expected


def test_cold_test_history_is_the_onboarding_items(world) -> None:
    events, space, tokens, _, items = world
    index = item_index(items)
    examples = build_examples(events, space, tokens, max_history=10)
    cold_test = np.flatnonzero(
        (events.split.to_numpy() == "test") & (events.cohort.to_numpy() == "cold")
    )
    assert len(cold_test) > 0
    for row in cold_test:
        user_events = events[events.user_id == events.user_id.iat[row]]
        onboarding = user_events[user_events.split == "onboarding"].item_id.tolist()
        assert len(onboarding) == 5
        assert examples.history_len[row] == 5
        assert examples.history[row, :5].tolist() == [index[i] for i in onboarding]
        assert (examples.history[row, 5:] == 0).all()


def test_cold_user_gets_unknown_user_index(world) -> None:
    events, space, tokens, _, _ = world
    examples = build_examples(events, space, tokens, max_history=4)
    cold = events.cohort.to_numpy() == "cold"
    assert (examples.user_idx[cold] == 0).all()
    assert (examples.user_idx[~cold] >= 1).all()
    warm_ids = sorted(set(events.user_id[~cold]))
    for row in np.flatnonzero(~cold)[:20]:
        expected = warm_ids.index(events.user_id.iat[row]) + 1
        assert examples.user_idx[row] == expected


def test_examples_carry_labels_items_and_user_features(world) -> None:
    events, space, tokens, _, items = world
    index = item_index(items)
    examples = build_examples(events, space, tokens, max_history=4)
    assert len(examples) == len(events)
    assert examples.label.dtype == np.float32
    assert examples.label.tolist() == events.click.astype(float).tolist()
    assert examples.item_idx.tolist() == [index[i] for i in events.item_id]
    assert examples.user_id.tolist() == events.user_id.tolist()
    assert examples.user_feats.shape == (len(events), 4)
    for row in (0, len(events) // 2, len(events) - 1):
        assert examples.user_feats[row].tolist() == tokens[events.user_id.iat[row]]


def test_user_without_side_features_gets_unknown_tokens(world) -> None:
    events, space, tokens, _, _ = world
    some_user = int(events.user_id.iat[0])
    partial = {u: t for u, t in tokens.items() if u != some_user}
    examples = build_examples(events, space, partial, max_history=4)
    rows = events.user_id.to_numpy() == some_user
    assert (examples.user_feats[rows] == 0).all()


def test_take_and_concat_keep_fields_aligned(world) -> None:
    events, space, tokens, _, _ = world
    examples = build_examples(events, space, tokens, max_history=4)
    picked = examples.take(np.array([5, 2]))
    assert picked.item_idx.tolist() == [examples.item_idx[5], examples.item_idx[2]]
    assert (picked.history[1] == examples.history[2]).all()
    both = type(examples).concat([picked, examples.take(np.array([0]))])
    assert len(both) == 3
    assert both.user_id.tolist() == [examples.user_id[i] for i in (5, 2, 0)]


# --- negatives ------------------------------------------------------------------------


def test_negatives_are_non_clicks_in_the_catalogue_sharing_the_context(world) -> None:
    events, space, tokens, _, _ = world
    examples = build_examples(events, space, tokens, max_history=4)
    rng = np.random.default_rng(0)
    negatives = sample_negatives(examples, space.num_items, {}, 3, rng)
    assert len(negatives) == 3 * len(examples)
    assert (negatives.label == 0).all()
    assert negatives.label.dtype == np.float32
    assert negatives.item_idx.min() >= 1, "index 0 is padding, never a candidate"
    assert negatives.item_idx.max() < space.num_items
    source = np.repeat(np.arange(len(examples)), 3)
    assert (negatives.user_id == examples.user_id[source]).all()
    assert (negatives.history == examples.history[source]).all()
    assert (negatives.history_len == examples.history_len[source]).all()
    assert (negatives.user_feats == examples.user_feats[source]).all()


def test_negatives_cover_the_whole_catalogue(world) -> None:
    events, space, tokens, _, _ = world
    examples = build_examples(events, space, tokens, max_history=4)
    negatives = sample_negatives(
        examples, space.num_items, {}, 20, np.random.default_rng(1)
    )
    assert set(negatives.item_idx.tolist()) == set(range(1, space.num_items))


def test_negatives_mostly_avoid_seen_items(world) -> None:
    events, space, tokens, _, _ = world
    examples = build_examples(events, space, tokens, max_history=4)
    num_items = 101
    # Each user has seen 30% of the catalogue: a single draw hits it 30% of the
    # time; with the one re-draw about 9% (0.3 ** 2) of draws stay seen.
    rng = np.random.default_rng(2)
    seen = {
        int(u): set(rng.choice(np.arange(1, num_items), 30, replace=False).tolist())
        for u in np.unique(examples.user_id)
    }
    negatives = sample_negatives(examples, num_items, seen, 40, rng)
    hits = np.mean(
        [item in seen[int(u)] for u, item in zip(negatives.user_id, negatives.item_idx)]
    )
    assert len(negatives) > 10_000
    assert hits < 0.15, f"{hits:.3f} of negatives are seen items"


def test_zero_negatives_gives_an_empty_set(world) -> None:
    events, space, tokens, _, _ = world
    examples = build_examples(events, space, tokens, max_history=4)
    none = sample_negatives(examples, space.num_items, {}, 0, np.random.default_rng())
    assert len(none) == 0
    assert none.history.shape == (0, 4)


# --- ranking users --------------------------------------------------------------------


def test_ranking_users_seen_and_relevant_sets(world) -> None:
    events, space, tokens, _, items = world
    index = item_index(items)
    examples = build_examples(events, space, tokens, max_history=4)
    users = ranking_users(events, examples)

    test_clicks = (events.split == "test") & (events.click == 1)
    with_test_click = set(events.user_id[test_clicks])
    assert {u.user_id for u in users} == with_test_click
    assert {u.cohort for u in users} == {"warm", "cold"}
    for user in users:
        mine = events[events.user_id == user.user_id]
        seen_split = "train" if user.cohort == "warm" else "onboarding"
        seen = mine[mine.split == seen_split].item_id
        clicks = mine[(mine.split == "test") & (mine.click == 1)].item_id
        assert user.seen == {index[i] for i in seen}, user.user_id
        assert user.relevant == {index[i] for i in clicks}, user.user_id
        assert user.cohort == ("cold" if user.user_id % 5 == 0 else "warm")
        assert (user.user_idx == 0) == (user.cohort == "cold")
        assert user.user_feats == tokens[user.user_id]
        context_splits = (
            ["train", "valid"] if user.cohort == "warm" else ["onboarding"]
        )
        context = mine[mine.split.isin(context_splits)].tail(4)
        assert user.history == [index[i] for i in context.item_id]
        assert user.history_feedback == [
            FEEDBACK_CLICK if c else FEEDBACK_NO_CLICK for c in context.click
        ]


# --- data.features --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "bucket"),
    [
        ("1", "<18"),
        ("17", "<18"),
        ("18", "18-24"),
        ("24", "18-24"),
        ("25", "25-34"),
        ("34", "25-34"),
        ("35", "35-44"),
        ("44", "35-44"),
        ("45", "45-49"),
        ("49", "45-49"),
        ("50", "50-55"),
        ("55", "50-55"),
        ("56", "56+"),
        ("73", "56+"),
        ("30.0", "25-34"),
        ("abc", UNKNOWN),
        ("", UNKNOWN),
        ("nan", UNKNOWN),
        ("inf", UNKNOWN),
        (" 30 ", "25-34"),
        ("1e1", "<18"),
        ("3_1", UNKNOWN),
        ("\u0663\u0661", UNKNOWN),  # 31 in Arabic-Indic digits
        ("-0.5", UNKNOWN),
        ("121", UNKNOWN),
    ],
)
def test_age_bucket(age: str, bucket: str) -> None:
    assert age_bucket(age) == bucket


@pytest.mark.parametrize(
    ("code", "prefix"),
    [("55105", "5"), (" 02139 ", "0"), ("T8H1N", "other"), ("", "other"), (9, "9")],
)
def test_zip_prefix(code, prefix: str) -> None:
    assert zip_prefix(code) == prefix


def test_feature_space_indexes_from_1_and_reserves_0(world) -> None:
    _, space, _, users, items = world
    assert space.num_items == N_ITEMS + 1
    assert space.item_index([101, 140, 999]).tolist() == [1, N_ITEMS, 0]
    assert space.has_item(120) and not space.has_item(999)
    assert space.user_index([5, 10]).tolist() == [0, 0], "cold users have no id row"
    assert space.user_index([1]).tolist() == [1]
    assert UNKNOWN not in space.user_vocab["age"]
    assert space.user_vocab["zip"] == sorted({zip_prefix(z) for z in users.zip})
    assert space.item_vocab == {"genres": ["comedy", "drama", "horror"]}
    first = items.genres.iat[0]
    assert space.item_tokens["genres"][0] == [
        space.item_vocab["genres"].index(g) + 1 for g in first
    ]


def test_known_feature_values_get_their_vocabulary_index(world) -> None:
    space = world[1]
    tokens = space.encode_user(
        {"age": "30", "gender": "M", "occupation": "doctor", "zip": "91234"}
    )
    vocab = space.user_vocab
    assert tokens == [
        vocab["age"].index("25-34") + 1,
        vocab["gender"].index("M") + 1,
        vocab["occupation"].index("doctor") + 1,
        vocab["zip"].index("9") + 1,
    ]


def test_unknown_feature_values_get_index_0(world) -> None:
    space = world[1]
    # never-seen category, a non-number age, an overflowing one, a missing zip
    assert space.encode_user({"age": "old", "gender": "X", "occupation": "pilot"}) == [
        0,
        0,
        0,
        0,
    ]
    assert space.encode_user({"age": "inf"})[0] == 0
    assert space.encode_user({}) == [0, 0, 0, 0]


def test_feature_space_save_load_round_trip(world, tmp_path: Path) -> None:
    space = world[1]
    path = tmp_path / "space.json"
    space.save(path)
    loaded = FeatureSpace.load(path)
    assert loaded == space
    assert list(loaded.user_features) == list(space.user_features), "order kept"
    ids = [1, 5, 7, 999]
    assert loaded.user_index(ids).tolist() == space.user_index(ids).tolist()
    assert loaded.item_index([101, 140]).tolist() == [1, N_ITEMS]
    features = {"age": "30", "gender": "F", "occupation": "writer", "zip": "T8H"}
    assert loaded.encode_user(features) == space.encode_user(features)


def small_space() -> FeatureSpace:
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "age": ["20", "30", "x"],
            "zip": ["12345", "23456", "abc"],
            "job": ["cook", None, "pilot"],
        }
    )
    items = pd.DataFrame({"item_id": [1], "genres": [["a"]]})
    kinds = {"age": "age_bucket", "zip": "zip_prefix", "job": "categorical"}
    return FeatureSpace.build(users, items, kinds, ["genres"], [1, 2, 3])


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("job", "cook", None),
        ("job", "unknown", None),
        ("job", "", None),
        ("job", "chef", "job 'chef' was not seen in training; the known values are"),
        ("age", "24", None),
        ("age", "old", "age 'old' is not an age in years"),
        ("age", "70", "age '70' falls in '56+', which no training user had"),
        ("zip", "19999", None),
        ("zip", "99999", "zip '99999' falls in '9', which no training user had"),
    ],
)
def test_user_value_problem_names_what_would_be_unknown(
    name: str, value: str, problem: str | None
) -> None:
    found = small_space().user_value_problem(name, value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found
        assert found.endswith(f"leave {name} out to serve the user as unknown")


def test_missing_and_unreadable_values_are_counted_as_unknown() -> None:
    from data.features import unknown_values

    space = small_space()
    users = pd.DataFrame(
        {"user_id": [1, 2], "age": ["x", "30"], "zip": ["", "1"], "job": [None, "cook"]}
    )
    items = pd.DataFrame({"item_id": [1, 2], "genres": [[], ["a"]]})
    found = unknown_values(users, items, space.user_features, ["genres"])
    assert {name: len(values) for name, values in found.items()} == {
        "user.age": 1,
        "user.zip": 1,
        "user.job": 1,
        "item.genres": 1,
    }
    assert found["user.age"] == ["x"]
    assert space.encode_users(users)[1] == [0, 0, 0], "each of them is token 0"


def test_negatives_follow_the_given_probabilities(world) -> None:
    events, space, tokens, _, _ = world
    examples = build_examples(events, space, tokens, max_history=4)
    probabilities = np.zeros(space.num_items)
    probabilities[1], probabilities[2] = 0.9, 0.1
    rng = np.random.default_rng(3)
    # Item 1 is seen by the first user: redrawn once, so it stays with
    # probability 0.9 for that user's negatives.
    first = int(examples.user_id[0])
    negatives = sample_negatives(
        examples, space.num_items, {first: {1}}, 200, rng, probabilities
    )
    assert set(negatives.item_idx.tolist()) == {1, 2}
    others = negatives.user_id != first
    share = np.mean(negatives.item_idx[others] == 1)
    assert 0.88 < share < 0.92, share
    mine = np.mean(negatives.item_idx[~others] == 1)
    assert 0.78 < mine < 0.84, f"{mine}: one redraw of 0.9 leaves 0.81"


def test_a_half_star_reads_on_the_side_of_the_click_its_label_is_on():
    # Labels: a click is a rating of 4 and up, so 3.5 is no click, 4.5 is.
    ratings = np.array([3.5, 4.5, 1.5, 5.0, np.nan])
    clicks = (np.nan_to_num(ratings) >= 4).astype(int)
    codes = feedback_codes(clicks, ratings)
    assert codes[:4].tolist() == [FEEDBACK_RATING_BASE + r for r in (3, 4, 1, 5)]
    assert codes[4] == FEEDBACK_NO_CLICK  # no rating: its click code
    implied = clicks_only(codes)
    assert (implied == np.where(clicks > 0, FEEDBACK_CLICK, FEEDBACK_NO_CLICK)).all()
