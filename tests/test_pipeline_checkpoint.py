"""Checkpoints of the default (unsharded) trainer: the same code as a sharded
run's, through ``torch.distributed.checkpoint`` in one process."""

from __future__ import annotations

import itertools
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from data.examples import FEEDBACK_CLICK, FEEDBACK_UNKNOWN, clicks_only
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.ingest import run_ingest
from pipeline.prepare import data_shard, prepare
from pipeline.train import Trainer, complete_checkpoints, negative_draw


@pytest.fixture(scope="module")
def prepared(ml100k_dir: Path, tmp_path_factory):
    work = tmp_path_factory.mktemp("checkpoint")
    run_ingest(PipelineConfig(data=ml100k_dir, work_dir=work))
    return prepare(work, 20)


@pytest.fixture(autouse=True)
def _tracked(tmp_path: Path):
    """The trainer logs its curves to the active MLflow run."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.set_experiment("checkpoints")  # not an earlier test's id
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        yield


def test_resumed_trainer_ends_where_the_uninterrupted_one_does(prepared, tmp_path):
    # With the ranking term on: its draws must resume too.
    config = TrainConfig(
        max_steps=60,
        epochs=1,
        student_epochs=0,
        checkpoint_every=20,
        background_sync=False,
        distill_ranking=1.0,
    )
    whole = Trainer(prepared, config)
    whole.run(tmp_path / "whole")
    cut = Trainer(prepared, config.model_copy(update={"max_steps": 40}))
    cut.run(tmp_path / "cut")
    done = complete_checkpoints(tmp_path / "cut")
    assert [p.name for p in done] == ["step-00000020", "step-00000040"]

    resumed = Trainer(prepared, config)
    resumed.load_checkpoint(done[-1])
    assert resumed.step == 40 and resumed.ema.num_updates == 40
    resumed.run(tmp_path / "resumed")
    pairs = [
        (whole.teacher, resumed.teacher),
        (whole.students["student"].network, resumed.students["student"].network),
    ]
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    a, b = whole.ema.synced_shadow(), resumed.ema.synced_shadow()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_checkpoint_of_another_world_size_is_refused(prepared, tmp_path):
    config = TrainConfig(max_steps=20, epochs=1, student_epochs=0, checkpoint_every=20)
    trainer = Trainer(prepared, config)
    trainer.run(tmp_path)
    path = complete_checkpoints(tmp_path)[-1]
    meta = path / "meta.json"
    meta.write_text(meta.read_text().replace('"world_size": 1', '"world_size": 2'))
    with pytest.raises(ValueError, match="--nproc 2"):
        Trainer(prepared, config).load_checkpoint(path)


def test_a_damaged_checkpoint_is_named_with_the_fix(prepared, tmp_path):
    config = TrainConfig(max_steps=20, epochs=1, student_epochs=0, checkpoint_every=20)
    Trainer(prepared, config).run(tmp_path)
    path = complete_checkpoints(tmp_path)[-1]
    meta = path / "meta.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{meta} is not valid JSON.*drop --resume"):
        Trainer(prepared, config).load_checkpoint(path)
    meta.write_text('{"step": 20}')
    with pytest.raises(ValueError, match="lacks student_steps, world_size"):
        Trainer(prepared, config).load_checkpoint(path)
    meta.write_text(text)
    for data in path.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{path} does not load"):
        Trainer(prepared, config).load_checkpoint(path)


def test_ranking_rows_are_each_shards_own_draw(prepared):
    """A rank holding some data shards picks, for the ranking term, the same
    rows of them as one process holding them all, against the same items."""
    config = TrainConfig(
        epochs=1, student_epochs=0, distill_ranking=1.0, ranking_rows=64
    )
    trainer = Trainer(prepared, config)
    examples = next(trainer.epoch_batches(0))
    student, teacher = trainer.ranking_batches(examples, examples)
    assert student.item_idx.shape == (len(student.user_idx), config.ranking_candidates)
    candidates = student.item_idx[0]
    assert len(set(candidates.tolist())) == config.ranking_candidates
    assert candidates.min() >= 1 and candidates.max() < prepared.space.num_items
    assert (student.item_idx == candidates).all()
    assert (teacher.item_idx == candidates).all()
    assert len(student.user_idx) == 64  # 8 per data shard

    shards = data_shard(examples.user_id, config.data_shards)
    half = examples.take(np.flatnonzero(shards < config.data_shards // 2))
    ours = examples.take(trainer.ranking_rows(examples))
    ours = ours.take(np.flatnonzero(data_shard(ours.user_id, 8) < 4))
    theirs = half.take(trainer.ranking_rows(half))
    assert len(theirs) == 32
    for field in ("user_id", "item_idx", "history", "history_len", "label"):
        assert np.array_equal(getattr(ours, field), getattr(theirs, field)), field


def test_no_ranking_rows_when_no_student_ranks(prepared):
    """The ranking term is off by default: no rows are scored for it."""
    trainer = Trainer(prepared, TrainConfig(epochs=1))
    examples = next(trainer.epoch_batches(0))
    assert trainer.ranking_batches(examples, examples) is None


def test_student_rows_are_cut_to_first_events_or_lose_some_of_their_feedback(
    prepared,
):
    config = TrainConfig(
        epochs=1,
        cold_history_share=0.5,
        unknown_feedback_share=0.3,
        clicks_only_feedback_share=0.3,
    )
    trainer = Trainer(prepared, config)
    examples = next(trainer.epoch_batches(0))
    styled = trainer.cold_style(examples)
    cut = styled.history_len != examples.history_len
    kept = np.flatnonzero(~cut & (examples.history_len > 0))
    hidden = kept[(styled.history_feedback[kept] == FEEDBACK_UNKNOWN).all(1)]
    as_clicks = clicks_only(examples.history_feedback)
    reduced = kept[
        (styled.history_feedback[kept] == as_clicks[kept]).all(1)
        & (styled.history_feedback[kept] != examples.history_feedback[kept]).any(1)
    ]
    assert 0.35 < cut.mean() < 0.65
    assert 0.2 < len(hidden) / len(kept) < 0.4
    assert 0.2 < len(reduced) / len(kept) < 0.4
    first = {}  # the first events of every train user: (item, code) in order
    train = prepared.select("warm", "train")
    for row in np.flatnonzero((train.history_len < 5) & (train.rated == 1)):
        first.setdefault(int(train.user_id[row]), {})[int(train.history_len[row])] = (
            int(train.item_idx[row]),
            int(train.feedback[row]),
        )
    for row in np.flatnonzero(cut)[:200]:
        events = first[int(styled.user_id[row])]
        assert styled.history_len[row] == 5
        assert styled.history[row, :5].tolist() == [events[n][0] for n in range(5)]
        seen = styled.history_feedback[row, :5].tolist()
        codes = [events[n][1] for n in range(5)]
        assert min(codes) > FEEDBACK_CLICK, "MovieLens events carry their rating"
        views = ([FEEDBACK_UNKNOWN] * 5, codes, clicks_only(codes).tolist())
        assert seen in views, row
    for row in kept:
        assert np.array_equal(styled.history[row], examples.history[row])
        if row not in hidden and row not in reduced:
            assert np.array_equal(
                styled.history_feedback[row], examples.history_feedback[row]
            )


def test_popularity_offset_is_the_log_of_each_items_train_interactions(prepared):
    trainer = Trainer(prepared, TrainConfig(epochs=1, popularity_offset=True))
    train = prepared.select("warm", "train")
    counts = np.bincount(train.item_idx, minlength=prepared.space.num_items)
    expected = torch.from_numpy(np.log1p(counts).astype(np.float32))
    assert (counts[1:] <= 2).any() and counts.max() > 300, "rare and popular items"
    for network in (trainer.teacher, *(s.network for s in trainer.students.values())):
        assert torch.equal(network.item_log_count, expected)
    with trainer.buffer.read() as snapshot:
        assert torch.equal(snapshot.module.item_log_count, expected)
    trainer.buffer.close()


def test_student_ends_as_the_ema_of_its_weights_over_its_final_steps(prepared):
    trainer = Trainer(prepared, TrainConfig(epochs=1, background_sync=False))
    student = trainer.students["student"]
    weight = dict(student.network.named_parameters())["head.0.weight"]
    batches = trainer.epoch_batches(0)
    trainer.student_step(next(batches))
    # 30 steps to come: the decay is capped at 1 - 3 / 30, below the configured
    # 0.999, and the average starts from the student's current weights.
    trainer.start_averages(30)
    assert student.average.decay == pytest.approx(0.9)
    expected = weight.detach().clone()
    for examples in itertools.islice(batches, 4):
        trainer.student_step(examples)
        expected = 0.9 * expected + 0.1 * weight.detach()
    last = weight.detach().clone()
    trainer.average_students()
    assert student.average is None
    assert torch.allclose(weight.detach(), expected, atol=1e-6)
    assert not torch.allclose(weight.detach(), last, atol=1e-4)
    trainer.start_averages(30_000)
    assert student.average.decay == 0.999


def test_no_student_average_keeps_the_last_weights(prepared):
    trainer = Trainer(prepared, TrainConfig(epochs=1, student_ema_decay=0.0))
    student = trainer.students["student"]
    trainer.start_averages(1_000)
    assert student.average is None
    trainer.student_step(next(iter(trainer.epoch_batches(0))))
    before = {k: v.clone() for k, v in student.network.state_dict().items()}
    trainer.average_students()
    after = student.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cut_rows_can_learn_from_the_labels_alone(prepared):
    terms = {}
    for cut_rows in (True, False):
        config = TrainConfig(
            epochs=1,
            distill_cut_rows=cut_rows,
            distill_interact=1.0,
            background_sync=False,
        )
        trainer = Trainer(prepared, config)
        terms[cut_rows] = trainer.student_step(next(iter(trainer.epoch_batches(0))))
    assert terms[True]["distill/label"] == terms[False]["distill/label"]
    assert terms[True]["distill/interact"] != terms[False]["distill/interact"]


def test_negatives_are_drawn_by_popularity_and_ranking_adds_it_back(prepared):
    trainer = Trainer(prepared, TrainConfig(epochs=1, negative_popularity=1.0))
    train = prepared.select("warm", "train")
    counts = np.bincount(train.item_idx, minlength=prepared.space.num_items)
    probabilities, ratio = negative_draw(counts, 1.0)
    assert probabilities[0] == 0 and np.isclose(probabilities.sum(), 1)
    weights = counts[1:] + 1
    np.testing.assert_allclose(probabilities[1:], weights / weights.sum())
    expected = torch.from_numpy(ratio)
    for network in (trainer.teacher, *(s.network for s in trainer.students.values())):
        assert torch.equal(network.negative_log_ratio, expected)
    uniform = Trainer(prepared, TrainConfig(epochs=1, negative_popularity=0.0))
    assert "negative_log_ratio" not in uniform.teacher.state_dict()
    assert negative_draw(counts, 0.0)[0] is None
    interactions = []
    for run in (uniform, trainer):
        batch = next(run.epoch_batches(0))
        interactions.append(counts[batch.item_idx[batch.rated == 0]].mean())
        run.buffer.close()
    # Train interactions of the average negative: about 38 drawn uniformly.
    assert interactions[1] > 2 * interactions[0], interactions
