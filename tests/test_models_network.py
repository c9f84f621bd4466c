"""models.network, distill, quantize and store on a small synthetic catalogue."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from data.examples import (
    FEEDBACK_CLICK,
    FEEDBACK_CODES,
    FEEDBACK_CODES_WITH_RATINGS,
    FEEDBACK_NO_CLICK,
    FEEDBACK_RATING_BASE,
    FEEDBACK_UNKNOWN,
)
from data.features import FeatureSpace
from models.distill import DistillWeights, Ranked, distillation_loss, ranking_kl
from models.network import Batch, NetworkConfig, Output, RecNetwork
from models.quantize import (
    WEIGHT_RANGE,
    Int8PairHead,
    embedding_bytes,
    quantize_dense,
    quantize_head,
    quantize_student,
    quantize_tables,
)
from models.store import load_network, save_network

D, L, B = 8, 5, 6


@pytest.fixture(scope="module")
def space() -> FeatureSpace:
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 4, 6, 7],
            "age": ["17", "30", "45", "60", "22", "33"],
            "gender": ["M", "F", "M", "F", "F", "M"],
            "zip": ["12345", "T8H1N", "55555", "02139", "91234", "T0A"],
        }
    )
    genres = ["drama", "comedy", "horror", "war"]
    items = pd.DataFrame(
        {
            "item_id": range(101, 121),
            "title": [f"film {i}" for i in range(20)],
            "genres": [
                [genres[i % 4]] + [genres[(i + 1) % 4]] * (i % 2) for i in range(20)
            ],
        }
    )
    items.at[3, "genres"] = []  # an item with no genre at all
    features = {"age": "age_bucket", "gender": "categorical", "zip": "zip_prefix"}
    return FeatureSpace.build(users, items, features, ["genres"], [1, 2, 3, 4, 6, 7])


def make_network(
    space: FeatureSpace,
    use_user_id: bool = True,
    seed: int = 0,
    feedback: bool = False,
    ratings: bool = False,
):
    torch.manual_seed(seed)
    config = NetworkConfig.from_space(
        space,
        use_user_id,
        embedding_dim=D,
        hidden_dim=16,
        history_feedback=feedback,
        feedback_ratings=ratings,
    )
    model = RecNetwork(config, space.item_tokens).eval()
    # Trained-looking tables: TorchRec's default init is tiny and would hide
    # quantization error. The feedback vectors start at zero; training moves
    # them (the unknown code's row stays zero).
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if "embedding_bags" in name:
                tensor.normal_(0.0, 0.5)
        if feedback:
            model.feedback.weight[1:].normal_(0.0, 0.5)
    return model, config


@pytest.fixture(scope="module")
def teacher(space):
    return make_network(space, use_user_id=True)


@pytest.fixture(scope="module")
def student(space):
    """The student reads history feedback; the teacher fixture does not."""
    return make_network(space, use_user_id=False, seed=1, feedback=True)


def make_batch(space: FeatureSpace, seed: int = 0, size: int = B) -> Batch:
    """Random users; the last one has no history, the first a full one."""
    rng = np.random.default_rng(seed)
    n_features = len(space.user_features)
    vocab = [len(v) + 1 for v in space.user_vocab.values()]
    lengths = rng.integers(1, L + 1, size=size)
    lengths[0], lengths[-1] = L, 0
    history = rng.integers(1, space.num_items, size=(size, L))
    past = np.arange(L)[None, :] >= lengths[:, None]
    history[past] = 0
    feedback = rng.integers(FEEDBACK_NO_CLICK, FEEDBACK_CLICK + 1, size=(size, L))
    feedback[past] = FEEDBACK_UNKNOWN
    feats = np.stack(
        [rng.integers(0, vocab[f], size=size) for f in range(n_features)], 1
    )
    return Batch(
        user_idx=torch.from_numpy(rng.integers(0, len(space.user_ids) + 1, size=size)),
        user_feats=torch.from_numpy(feats),
        item_idx=torch.from_numpy(rng.integers(1, space.num_items, size=size)),
        history=torch.from_numpy(history),
        history_len=torch.from_numpy(lengths),
        label=torch.from_numpy(rng.integers(0, 2, size=size).astype(np.float32)),
        rated=torch.from_numpy((rng.random(size) < 0.6).astype(np.float32)),
        history_feedback=torch.from_numpy(feedback),
    )


# --- forward ----------------------------------------------------------------------


def test_forward_shapes(space, teacher) -> None:
    model, _ = teacher
    out = model(make_batch(space))
    assert out.logit.shape == (B,)
    assert out.user_embedding.shape == (B, D)
    assert out.attention.shape == (B, L)


def test_attention_sums_to_1_with_history_and_0_without(space, teacher) -> None:
    model, _ = teacher
    batch = make_batch(space, seed=2)
    with torch.no_grad():
        out = model(batch)
    sums = out.attention.sum(-1)
    for row, n in enumerate(batch.history_len.tolist()):
        if n:
            assert sums[row].item() == pytest.approx(1.0, abs=1e-6), row
            assert (out.attention[row, :n] > 0).all()
        else:
            assert sums[row].item() == 0.0
        assert (out.attention[row, n:] == 0).all(), "no weight past the history"
    for tensor in (out.logit, out.user_embedding, out.attention):
        assert torch.isfinite(tensor).all()


def test_feedback_network_starts_as_the_network_without_it(space) -> None:
    config = NetworkConfig.from_space(space, False, embedding_dim=D, hidden_dim=16)
    torch.manual_seed(5)
    plain = RecNetwork(config, space.item_tokens).eval()
    torch.manual_seed(5)
    reading = RecNetwork(
        dataclasses.replace(config, history_feedback=True), space.item_tokens
    ).eval()
    assert not reading.feedback.weight.any()
    batch = make_batch(space, seed=4)
    with torch.no_grad():
        a, b = plain(batch), reading(batch)
    assert torch.equal(a.logit, b.logit)
    assert torch.equal(a.user_embedding, b.user_embedding)


def embedding_with_feedback(model, batch: Batch, code: int) -> torch.Tensor:
    """The user embeddings of ``batch`` with every history entry's feedback
    set to ``code``."""
    inside = torch.arange(L)[None, :] < batch.history_len[:, None]
    feedback = torch.where(inside, code, FEEDBACK_UNKNOWN)
    with torch.no_grad():
        styled = dataclasses.replace(batch, history_feedback=feedback)
        return model.encode_user(styled)[0]


def test_clicks_move_the_user_and_unknown_feedback_reads_items_alone(
    space, student
) -> None:
    model, _ = student
    batch = make_batch(space, seed=6)
    has_history = batch.history_len > 0

    def embedding(code):
        return embedding_with_feedback(model, batch, code)

    clicked, skipped = embedding(FEEDBACK_CLICK), embedding(FEEDBACK_NO_CLICK)
    unknown = embedding(FEEDBACK_UNKNOWN)
    assert (clicked - skipped)[has_history].abs().amax(1).min() > 1e-3
    # Without history, no feedback to read: every row is the same.
    assert torch.equal(clicked[~has_history], unknown[~has_history])
    with torch.no_grad():
        absent = model.encode_user(dataclasses.replace(batch, history_feedback=None))[0]
    assert torch.equal(absent, unknown)


@pytest.mark.parametrize("ratings", [False, True])
def test_ratings_are_read_only_by_a_network_with_rating_vectors(space, ratings) -> None:
    model, _ = make_network(
        space, use_user_id=False, seed=2, feedback=True, ratings=ratings
    )
    batch = make_batch(space, seed=7)
    has_history = batch.history_len > 0

    def embedding(code):
        return embedding_with_feedback(model, batch, code)

    loved = embedding(FEEDBACK_RATING_BASE + 5)
    liked = embedding(FEEDBACK_RATING_BASE + 4)
    panned, clicked = embedding(FEEDBACK_RATING_BASE + 1), embedding(FEEDBACK_CLICK)
    skipped = embedding(FEEDBACK_NO_CLICK)
    if ratings:
        assert model.feedback.num_embeddings == FEEDBACK_CODES_WITH_RATINGS
        assert (loved - liked)[has_history].abs().amax(1).min() > 1e-3
        assert (liked - clicked)[has_history].abs().amax(1).min() > 1e-3
    else:
        # A rating reads as the click it implies: 4 and 5 are clicks, 1 is not.
        assert model.feedback.num_embeddings == FEEDBACK_CODES
        assert torch.equal(loved, clicked) and torch.equal(liked, clicked)
        assert torch.equal(panned, skipped)


def test_user_without_history_trains_without_nan(space, teacher) -> None:
    model, _ = teacher
    batch = make_batch(space, seed=3)
    batch.history_len[:] = 0
    batch.history[:] = 0
    model.zero_grad()
    out = model(batch)
    F.binary_cross_entropy_with_logits(out.logit, batch.label).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_padding_entries_do_not_change_the_output(space, teacher) -> None:
    model, _ = teacher
    batch = make_batch(space, seed=4)
    other = dataclasses.replace(batch, history=batch.history.clone())
    mask = torch.arange(L)[None, :] >= batch.history_len[:, None]
    other.history[mask] = 7  # garbage past each history's length
    with torch.no_grad():
        a, b = model(batch), model(other)
    torch.testing.assert_close(a.logit, b.logit, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.user_embedding, b.user_embedding, atol=1e-6, rtol=0)


def test_score_candidates_matches_forward(space, teacher) -> None:
    model, _ = teacher
    batch = make_batch(space, seed=5)
    candidates = torch.arange(1, space.num_items)
    with torch.no_grad():
        scores = model.score_candidates(batch, candidates)
        assert scores.shape == (B, len(candidates))
        for column, item in enumerate(candidates.tolist()):
            single = dataclasses.replace(batch, item_idx=torch.full((B,), item))
            out = model(single)
            torch.testing.assert_close(
                scores[:, column], out.rank_score(), atol=1e-5, rtol=0, msg=f"item {item}"
            )


def test_popularity_offset_lifts_each_items_interaction_logit(space) -> None:
    torch.manual_seed(3)
    config = NetworkConfig.from_space(
        space, False, embedding_dim=D, hidden_dim=16, popularity_offset=True
    )
    model = RecNetwork(config, space.item_tokens).eval()
    assert "item_log_count" in model.state_dict(), "saved with the network"
    batch = make_batch(space, seed=11)
    candidates = torch.arange(1, space.num_items)
    counts = torch.rand(space.num_items) * 5
    with torch.no_grad():
        before = model(batch)
        scores_before = model.score_candidates(batch, candidates)
        model.item_log_count.copy_(counts)
        after = model(batch)
        scores = model.score_candidates(batch, candidates)
    assert torch.equal(after.logit, before.logit), "the click head is left alone"
    torch.testing.assert_close(
        after.interact_logit, before.interact_logit + counts[batch.item_idx]
    )
    assert not torch.equal(scores, scores_before)
    with torch.no_grad():
        listed = dataclasses.replace(batch, item_idx=candidates.expand(B, -1))
        torch.testing.assert_close(scores, model(listed).rank_score())


def test_forward_scores_a_list_of_items_per_row(space, teacher) -> None:
    model, _ = teacher
    batch = make_batch(space, seed=6)
    items = torch.from_numpy(
        np.random.default_rng(6).integers(1, space.num_items, size=(B, 3))
    )
    with torch.no_grad():
        listed = model(dataclasses.replace(batch, item_idx=items))
        assert listed.logit.shape == listed.interact_logit.shape == (B, 3)
        assert listed.attention.shape == (B, 3, L)
        for column in range(3):
            one = model(dataclasses.replace(batch, item_idx=items[:, column]))
            torch.testing.assert_close(listed.logit[:, column], one.logit)
            torch.testing.assert_close(
                listed.rank_score()[:, column], one.rank_score()
            )
            torch.testing.assert_close(listed.attention[:, column], one.attention)


def _serving_networks(space, teacher, student) -> dict:
    return {
        "teacher": teacher[0],
        "student": student[0],
        "student_int8": quantize_tables(student[0]),
        "student_int8_dense": quantize_dense(quantize_tables(student[0])),
        "student_int8_static": quantize_head(
            quantize_tables(student[0]),
            [make_batch(space, seed=20, size=16)],
            torch.arange(space.num_items),
        ),
    }


@pytest.mark.parametrize(
    "which",
    ["teacher", "student", "student_int8", "student_int8_dense", "student_int8_static"],
)
def test_cached_candidates_score_like_score_candidates(
    space, teacher, student, which: str
) -> None:
    model = _serving_networks(space, teacher, student)[which]
    batch = make_batch(space, seed=11)
    candidates = torch.arange(space.num_items)
    with torch.no_grad():
        direct = model.score_candidates(batch, candidates)
        cache = model.candidate_cache(candidates)
        cached = model.score_encoded(model.encode_users(batch), cache)
    # Same operations on the same tensors; only the order of work differs.
    torch.testing.assert_close(cached, direct, atol=1e-6, rtol=0)


def test_encoded_users_can_be_scored_one_row_at_a_time(space, teacher) -> None:
    model, _ = teacher
    batch = make_batch(space, seed=12)
    with torch.no_grad():
        cache = model.candidate_cache(torch.arange(space.num_items))
        users = model.encode_users(batch)
        together = model.score_encoded(users, cache)
        rows = [
            model.score_encoded(users.rows(slice(i, i + 1)), cache) for i in range(B)
        ]
    assert users.rows(slice(2, 3)).history.shape == (1, L, D)
    torch.testing.assert_close(torch.cat(rows), together, atol=1e-6, rtol=0)


def test_teacher_has_a_user_id_table_the_student_lacks(space, teacher, student) -> None:
    t_state, s_state = teacher[0].state_dict(), student[0].state_dict()
    id_keys = [k for k in t_state if "t_user_id" in k]
    assert id_keys, "the teacher embeds user ids"
    assert t_state[id_keys[0]].shape == (len(space.user_ids) + 1, D)
    assert not [k for k in s_state if "t_user_id" in k]
    assert student[1].use_user_id is False


def test_student_ignores_user_ids_and_teacher_does_not(space, teacher, student) -> None:
    batch = make_batch(space, seed=6)
    other = dataclasses.replace(batch, user_idx=(batch.user_idx + 1) % 7)
    with torch.no_grad():
        s_a, s_b = student[0](batch), student[0](other)
        t_a, t_b = teacher[0](batch), teacher[0](other)
    assert torch.equal(s_a.logit, s_b.logit)
    assert not torch.allclose(t_a.user_embedding, t_b.user_embedding)


def test_item_vectors_keep_the_index_shape(space, teacher) -> None:
    model, _ = teacher
    index = torch.tensor([[1, 4], [3, 2]])  # item index 4 has no genre
    with torch.no_grad():
        vectors = model.item_vectors(index)
        one_by_one = [model.item_vectors(torch.tensor([i]))[0] for i in index.flatten()]
    assert vectors.shape == (2, 2, D)
    torch.testing.assert_close(
        vectors.reshape(-1, D), torch.stack(one_by_one), atol=1e-6, rtol=0
    )


def test_item_vectors_use_each_items_own_genres(space, teacher) -> None:
    model = copy.deepcopy(teacher[0])
    items = torch.arange(1, space.num_items)
    token = 2
    has_token = [token in tokens for tokens in space.item_tokens["genres"]]
    assert any(has_token) and not all(has_token)
    with torch.no_grad():
        before = model.item_vectors(items)
        model.item_tables.embedding_bags["t_genres"].weight[token] += 1.0
        after = model.item_vectors(items)
    changed = (after - before).abs().amax(-1) > 1e-4
    assert changed.tolist() == has_token


# --- distillation --------------------------------------------------------------------


def hand_terms(
    student: Output, teacher: Output, label: torch.Tensor, rated: torch.Tensor
) -> dict:
    """The four terms, written out from their definitions."""
    p = torch.sigmoid(student.logit)
    q = torch.sigmoid(teacher.logit)
    pi = torch.sigmoid(student.interact_logit)
    qi = torch.sigmoid(teacher.interact_logit)
    rows = teacher.attention.sum(-1) > 0
    t, s = teacher.attention[rows], student.attention[rows]
    kl = torch.where(t > 0, t * (t / s.clamp(min=1e-30)).log(), torch.zeros_like(t))

    def bce(prob, target, weight=None) -> float:
        loss = -(target * prob.log() + (1 - target) * (1 - prob).log())
        if weight is None:
            return loss.mean().item()
        return ((loss * weight).sum() / weight.sum()).item()

    return {
        "label": bce(pi, rated) + bce(p, label, rated),
        "embedding": ((student.user_embedding - teacher.user_embedding) ** 2)
        .mean()
        .item(),
        "attention": kl.sum(-1).mean().item(),
        "click": bce(p, q, rated),
        "interact": bce(pi, qi),
    }


@pytest.fixture(scope="module")
def outputs(space, teacher, student):
    batch = make_batch(space, seed=7)
    with torch.no_grad():
        return student[0](batch), teacher[0](batch), batch.label, batch.rated


def test_distillation_terms_match_their_definitions(outputs) -> None:
    s, t, label, rated = outputs
    total, terms = distillation_loss(s, t, label, rated)
    expected = hand_terms(s, t, label, rated)
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name] == pytest.approx(value, abs=1e-4), name
    assert terms["attention"] > 0.0 and terms["embedding"] > 0.0
    assert total.item() == pytest.approx(sum(expected.values()), abs=1e-4)


def test_untargeted_rows_leave_the_click_and_interaction_terms(outputs) -> None:
    s, t, label, rated = outputs
    targeted = (torch.arange(len(rated)) % 3 != 0).float()
    _, terms = distillation_loss(s, t, label, rated, targeted=targeted)
    keep = targeted.bool()

    def rows(o: Output) -> Output:
        return Output(o.logit[keep], o.interact_logit[keep], o.user_embedding, o.attention)

    expected = hand_terms(rows(s), rows(t), label[keep], rated[keep])
    for name in ("click", "interact"):
        assert terms[name] == pytest.approx(expected[name], abs=1e-4), name
    _, every = distillation_loss(s, t, label, rated)
    assert terms["interact"] != pytest.approx(every["interact"], abs=1e-4)
    assert terms["label"] == every["label"]
    assert terms["attention"] == every["attention"]


def test_identical_outputs_have_no_embedding_or_attention_loss(outputs) -> None:
    _, t, label, rated = outputs
    _, terms = distillation_loss(t, t, label, rated)
    assert terms["embedding"] == pytest.approx(0.0, abs=1e-9)
    assert terms["attention"] == pytest.approx(0.0, abs=1e-6)
    # The click and interaction terms are then the teacher's own entropy:
    # positive, not zero.
    assert terms["click"] > 0 and terms["interact"] > 0


@pytest.mark.parametrize(
    "off", ["label", "embedding", "attention", "click", "interact"]
)
def test_each_weight_switches_its_term_off(outputs, off: str) -> None:
    s, t, label, rated = outputs
    weights = DistillWeights(**{off: 0.0})
    total, terms = distillation_loss(s, t, label, rated, weights)
    assert total.item() == pytest.approx(
        sum(v for k, v in terms.items() if k != off), abs=1e-5
    )
    assert terms[off] > 0, "the term is still reported"


def test_weights_scale_their_terms(outputs) -> None:
    s, t, label, rated = outputs
    weights = DistillWeights(
        label=0.5, embedding=2.0, attention=0.0, click=3.0, interact=0.25
    )
    total, terms = distillation_loss(s, t, label, rated, weights)
    expected = (
        0.5 * terms["label"]
        + 2.0 * terms["embedding"]
        + 3.0 * terms["click"]
        + 0.25 * terms["interact"]
    )
    assert total.item() == pytest.approx(expected, abs=1e-5)


def test_attention_term_skips_rows_without_history(outputs) -> None:
    s, t, label, rated = outputs
    empty = Output(
        t.logit, t.interact_logit, t.user_embedding, torch.zeros_like(t.attention)
    )
    _, terms = distillation_loss(s, empty, label, rated)
    assert terms["attention"] == 0.0
    total, _ = distillation_loss(
        s,
        empty,
        label,
        rated,
        DistillWeights(label=0, embedding=0, click=0, interact=0),
    )
    assert total.item() == 0.0


@pytest.fixture(scope="module")
def ranked(space, teacher, student) -> Ranked:
    batch = make_batch(space, seed=9)
    items = torch.arange(1, space.num_items).expand(B, -1)
    listed = dataclasses.replace(batch, item_idx=items)
    with torch.no_grad():
        return Ranked(student[0](listed), teacher[0](listed))


def test_ranking_term_is_the_kl_of_the_softmax_over_candidates(ranked) -> None:
    t = torch.softmax(ranked.teacher.rank_score().double(), -1)
    s = torch.softmax(ranked.student.rank_score().double(), -1)
    expected = (t * (t / s).log()).sum(-1).mean().item()
    assert ranking_kl(ranked.student, ranked.teacher).item() == pytest.approx(
        expected, abs=1e-5
    )
    assert expected > 0
    assert ranking_kl(ranked.teacher, ranked.teacher).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_ranking_term_joins_the_total_with_its_weight(outputs, ranked) -> None:
    s, t, label, rated = outputs
    _, without = distillation_loss(s, t, label, rated)
    assert "ranking" not in without
    weights = DistillWeights(ranking=2.5)
    total, terms = distillation_loss(s, t, label, rated, weights, ranked=ranked)
    assert terms["ranking"] == pytest.approx(
        ranking_kl(ranked.student, ranked.teacher).item(), abs=1e-6
    )
    expected = sum(v for k, v in terms.items() if k != "ranking") + 2.5 * terms[
        "ranking"
    ]
    assert total.item() == pytest.approx(expected, abs=1e-4)


def test_switched_off_term_sends_no_gradient(space, student, teacher) -> None:
    model, _ = student
    batch = make_batch(space, seed=8)
    with torch.no_grad():
        t = teacher[0](batch)
    model.zero_grad()
    weights = DistillWeights(label=0, embedding=0, attention=0, click=0, interact=0)
    total, _ = distillation_loss(model(batch), t, batch.label, batch.rated, weights)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all((g == 0).all() for g in grads)
    model.zero_grad()


# --- INT8 ----------------------------------------------------------------------------

# Row-wise INT8 keeps each element within (max - min) / 255 / 2 of its value,
# about 0.004 for these N(0, 0.5) rows of 8. Measured through the towers the
# outputs move by at most ~0.003; 0.01 leaves room for other seeds.
QUANT_ATOL = 0.01


def test_quantized_tables_are_uint8(student) -> None:
    quantized = quantize_tables(student[0])
    tables = {
        k: v for k, v in quantized.state_dict().items() if "embedding_bags" in k
    }
    assert tables
    assert all(v.dtype == torch.uint8 for v in tables.values()), {
        k: v.dtype for k, v in tables.items()
    }
    float_tables = [k for k in student[0].state_dict() if "embedding_bags" in k]
    assert student[0].state_dict()[float_tables[0]].dtype == torch.float32, (
        "the float model is left alone"
    )


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_quantized_outputs_are_close_to_float(space, request, which: str) -> None:
    model, _ = request.getfixturevalue(which)
    quantized = quantize_tables(model)
    batch = make_batch(space, seed=9, size=32)
    with torch.no_grad():
        a, b = model(batch), quantized(batch)
        scores_a = model.score_candidates(batch, torch.arange(1, space.num_items))
        scores_b = quantized.score_candidates(batch, torch.arange(1, space.num_items))
    torch.testing.assert_close(b.logit, a.logit, atol=QUANT_ATOL, rtol=0)
    torch.testing.assert_close(
        b.user_embedding, a.user_embedding, atol=QUANT_ATOL, rtol=0
    )
    torch.testing.assert_close(b.attention, a.attention, atol=QUANT_ATOL, rtol=0)
    torch.testing.assert_close(scores_b, scores_a, atol=QUANT_ATOL, rtol=0)
    assert not torch.equal(b.logit, a.logit), "quantization should change something"


def test_quantization_shrinks_the_tables(student) -> None:
    model = student[0]
    before = embedding_bytes(model)
    after = embedding_bytes(quantize_tables(model))
    state = model.state_dict()
    rows = sum(v.shape[0] for k, v in state.items() if "embedding_bags" in k)
    assert before == rows * D * 4
    # One byte per element, plus at most 16 for each row's scale, offset and padding.
    assert after <= rows * (D + 16), (before, after)
    assert after < before, (before, after)


def test_quantize_student_records_its_choice(space, student) -> None:
    batch = make_batch(space, seed=10)
    candidates = torch.arange(1, space.num_items)
    never, info = quantize_student(student[0], batch, candidates, dense="never")
    assert info == {"embedding_tables": "int8 row-wise", "dense": "float32"}
    for dense in ("dynamic", "always"):
        _, info = quantize_student(student[0], batch, candidates, dense=dense)
        assert info["dense"] == "int8 dynamic"
    static, info = quantize_student(student[0], batch, candidates, dense="static")
    assert info["dense"] == "int8 static head"
    assert isinstance(static.head, Int8PairHead)
    _, info = quantize_student(student[0], batch, candidates, dense="auto")
    assert info["dense"] in ("float32", "int8 static head")
    assert info["dense_float_ms"] > 0 and info["dense_int8_ms"] > 0
    with pytest.raises(ValueError, match="dense"):
        quantize_student(student[0], batch, candidates, dense="sometimes")


# --- store ----------------------------------------------------------------------------


def outputs_of(model, batch):
    with torch.no_grad():
        out = model(batch)
        scores = model.score_candidates(batch, torch.arange(1, 21))
    return out, scores


def assert_same(a, b) -> None:
    (out_a, scores_a), (out_b, scores_b) = a, b
    assert torch.equal(out_a.logit, out_b.logit)
    assert torch.equal(out_a.user_embedding, out_b.user_embedding)
    assert torch.equal(out_a.attention, out_b.attention)
    assert torch.equal(scores_a, scores_b)


@pytest.mark.parametrize("network", ["teacher", "student"])
def test_float_network_round_trips(space, network, request, tmp_path: Path) -> None:
    model, config = request.getfixturevalue(network)
    save_network(model, config, tmp_path, network)
    loaded = load_network(tmp_path, network, space)
    assert not loaded.training
    assert loaded.config == config
    batch = make_batch(space, seed=11)
    assert_same(outputs_of(loaded, batch), outputs_of(model, batch))


@pytest.mark.parametrize("dense", ["never", "dynamic", "static"])
def test_int8_network_round_trips(space, student, tmp_path: Path, dense: str) -> None:
    model, config = student
    batch = make_batch(space, seed=12)
    quantized, info = quantize_student(model, batch, torch.arange(1, 21), dense=dense)
    save_network(quantized, config, tmp_path, "student", quantized=info)
    loaded = load_network(tmp_path, "student", space)
    state = loaded.state_dict()
    assert any(v.dtype == torch.uint8 for v in state.values() if torch.is_tensor(v))
    assert_same(outputs_of(loaded, batch), outputs_of(quantized, batch))


def test_loading_a_missing_network_names_the_file(space, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_network(tmp_path, "nothing", space)


@pytest.mark.parametrize(
    "damage", ["tensors cut short", "config edited", "tensors not a torch file"]
)
def test_loading_a_damaged_network_names_the_file(
    space, student, tmp_path: Path, damage: str
) -> None:
    model, config = student
    save_network(model, config, tmp_path, "student")
    if damage == "tensors cut short":
        tensors = tmp_path / "student.pt"
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "tensors not a torch file":
        (tmp_path / "student.pt").write_bytes(b"not a model")
    else:
        meta = tmp_path / "student.json"
        meta.write_text(meta.read_text().replace('"embedding_dim"', '"width"'))
    with pytest.raises(ValueError) as caught:
        load_network(tmp_path, "student", space)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'student'}.pt with student.json cannot")
    assert "write them again with the step that made them" in message
    # Never torch's advice to load without weights_only, which runs pickles.
    assert "weights_only" not in message and "\n" not in message


def test_dense_quantization_keeps_scores_close(space, student) -> None:
    model = quantize_tables(student[0])
    both = quantize_dense(model)
    batch = make_batch(space, seed=13, size=32)
    with torch.no_grad():
        torch.testing.assert_close(
            both(batch).logit, model(batch).logit, atol=0.1, rtol=0
        )


def test_static_head_keeps_scores_close(space, student) -> None:
    tables = quantize_tables(student[0])
    candidates = torch.arange(space.num_items)
    calibration = [make_batch(space, seed=s, size=16) for s in (20, 21)]
    static = quantize_head(tables, calibration, candidates)
    batch = make_batch(space, seed=14, size=32)
    with torch.no_grad():
        torch.testing.assert_close(static(batch).logit, tables(batch).logit, atol=0.1, rtol=0)
        scores = static.score_candidates(batch, candidates)
        expected = tables.score_candidates(batch, candidates)
    torch.testing.assert_close(scores, expected, atol=0.1, rtol=0)
    # The top candidates barely move.
    top = scores.topk(5, 1).indices
    expected_top = expected.topk(5, 1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top, expected_top)]
    assert np.mean(overlap) > 0.8


def test_static_head_codes_cannot_overflow_fbgemm_int16_pairs(space, student) -> None:
    # FBGEMM's AVX2 kernels add pairs of uint8 x int8 products in int16: with
    # 7-bit weights, no pair overflows whatever the activation codes.
    model = quantize_head(
        quantize_tables(student[0]), [make_batch(space, seed=20)], torch.arange(space.num_items)
    )
    low, high = WEIGHT_RANGE
    assert 255 * max(-low, high) * 2 <= 32767
    for layer in model.head.hidden:
        weights = layer.weight().int_repr()
        assert low <= weights.min() and weights.max() <= high


def test_float_head_without_autograd_matches_the_concatenation(space, student) -> None:
    model = student[0]
    batch = make_batch(space, seed=15)
    candidates = torch.arange(space.num_items)
    with torch.no_grad():
        fast = model.score_candidates(batch, candidates)
    with torch.enable_grad():
        concatenated = model.score_candidates(batch, candidates)
    torch.testing.assert_close(fast, concatenated.detach(), atol=1e-6, rtol=0)


def test_negative_popularity_adds_the_draws_log_ratio_to_ranking_only(space) -> None:
    torch.manual_seed(4)
    config = NetworkConfig.from_space(
        space, False, embedding_dim=D, hidden_dim=16, negative_popularity=1.0
    )
    model = RecNetwork(config, space.item_tokens).eval()
    assert "negative_log_ratio" in model.state_dict(), "saved with the network"
    batch = make_batch(space, seed=12)
    candidates = torch.arange(1, space.num_items)
    ratio = torch.randn(space.num_items)
    with torch.no_grad():
        before = model(batch)
        items = model.item_vectors(candidates)[None].expand(B, -1, -1)
        logits, _ = model._score(*model.encode_user(batch), items)
        model.negative_log_ratio.copy_(ratio)
        after = model(batch)
        scores = model.score_candidates(batch, candidates)
    # Training reads the logit learned against the draw, unchanged ...
    assert torch.equal(after.interact_logit, before.interact_logit)
    # ... ranking adds the item's log ratio to it.
    logits[..., 1] += ratio[candidates]
    torch.testing.assert_close(scores, F.logsigmoid(logits).sum(-1))
