"""The batch pipeline end to end on MovieLens-100K, against a real ``mlflow server``.

The run is short (few steps) so the suite stays fast; what is checked is that
every part is real and wired: Parquet out of ingest, curves with steps, the
``{model}/{cohort}/{metric}`` names, artifacts, the registry, the alias and its
gate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from pipeline.cli import main
from models.sharding import LocalPlacement
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.prepare import prepare, ranks_without_training_rows
from pipeline.run import run_step
from pipeline.train import Trainer

from tests.conftest import E2E_MODEL as MODEL


def test_ingest_writes_parquet_and_accounts_for_every_row(pipeline_run):
    config, results = pipeline_run
    ingest = results["ingest"]
    assert ingest["rows_in"] == ingest["rows_kept"] + ingest["rows_quarantined"]
    assert ingest["rows_kept"] == 100_000
    frame = pd.read_parquet(config.work_dir / "ingest" / "interactions.parquet")
    assert len(frame) == 100_000
    assert str(frame.dtypes["user_id"]) == "int64"
    assert frame["click"].isin([0, 1]).all()


def test_ingest_logs_unknown_feature_counts_to_mlflow(pipeline_run):
    config, results = pipeline_run
    counts = results["ingest"]["unknown_values"]
    features = json.loads((config.work_dir / "ingest" / "features.json").read_text())
    expected = [f"user.{name}" for name in features["user_features"]]
    assert sorted(counts) == sorted(expected + ["item.genres"])
    client = MlflowClient(config.tracking_uri)
    run_id = json.loads((config.work_dir / "run.json").read_text())["run_id"]
    logged = client.get_run(run_id).data.metrics
    for name, count in counts.items():
        assert logged[f"ingest/unknown_values.{name}"] == count


def test_training_curves_are_logged_with_steps(pipeline_run):
    config, _ = pipeline_run
    client = MlflowClient(config.tracking_uri)
    run_id = json.loads((config.work_dir / "run.json").read_text())["run_id"]
    history = client.get_metric_history(run_id, "train/teacher_loss")
    steps = [m.step for m in history]
    assert len(steps) >= 3 and steps == sorted(steps) and len(set(steps)) == len(steps)
    distill = client.get_metric_history(run_id, "distill/embedding")
    assert distill, "the student's distillation terms must be logged"
    run = client.get_run(run_id)
    assert run.data.params["train.distill_interval"] == "10"
    assert run.data.params["train.ema_decay"] == "0.995"


def test_training_keeps_a_window_of_scored_ema_snapshots(pipeline_run):
    import torch

    config, _ = pipeline_run
    folder = config.work_dir / "model" / "snapshots"
    window = json.loads((folder / "window.json").read_text())
    assert 1 <= len(window["snapshots"]) <= config.train.snapshot_window
    last = window["snapshots"][-1]
    assert last["metric"] is not None and last["metric"] > 0
    shadow = torch.load(folder / last["file"], weights_only=True)
    assert any("t_user_id" in name for name in shadow)


def test_metrics_cover_every_model_and_cohort(pipeline_run):
    config, results = pipeline_run
    client = MlflowClient(config.tracking_uri)
    run_id = json.loads((config.work_dir / "run.json").read_text())["run_id"]
    logged = client.get_run(run_id).data.metrics
    models = (
        "popularity", "online_teacher", "ema_teacher", "student", "student_int8",
        "student_int8_clicks_only", "student_int8_items_only",
    )  # fmt: skip
    for model in models:
        for cohort in ("cold", "warm"):
            for metric in ("auc", "log_loss", "recall_at_10", "ndcg_at_10"):
                name = f"{model}/{cohort}/{metric}"
                assert name in logged, name
                assert logged[name] == pytest.approx(results["evaluate"][name])
    # Popularity is deterministic on this split: a check on the metric code.
    assert logged["popularity/cold/recall_at_10"] == pytest.approx(0.337, abs=5e-4)
    assert logged["popularity/warm/auc"] == pytest.approx(0.703, abs=5e-4)
    # The INT8 student reads the onboarding ratings: reducing them to clicks,
    # or hiding them, changes its scores.
    for cohort in ("cold", "warm"):
        name = f"student_int8/{cohort}/log_loss"
        assert logged[name] != logged[name.replace("int8", "int8_clicks_only")]
        assert logged[name] != logged[name.replace("int8", "int8_items_only")]


def test_quality_table_and_plots_are_artifacts(pipeline_run):
    config, results = pipeline_run
    client = MlflowClient(config.tracking_uri)
    run_id = json.loads((config.work_dir / "run.json").read_text())["run_id"]
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    expected = ("quality.md", "quality.png", "training_curves.png", "user_recall.csv")
    assert {f"eval/{name}" for name in expected} <= names
    local = Path(client.download_artifacts(run_id, "eval/quality.md"))
    assert "student_int8" in local.read_text()
    # Each ranked user's Recall@10: their mean is the logged metric.
    recalls = pd.read_csv(client.download_artifacts(run_id, "eval/user_recall.csv"))
    for cohort in ("cold", "warm"):
        users = recalls[recalls["cohort"] == cohort]
        for model in ("popularity", "student_int8", "ema_teacher"):
            name = f"{model}/{cohort}/recall_at_10"
            assert users[model].mean() == pytest.approx(results["evaluate"][name])
            se = users[model].std() / len(users) ** 0.5
            assert results["evaluate"][f"{name}_se"] == pytest.approx(se)


def test_first_version_becomes_champion(pipeline_run):
    config, results = pipeline_run
    client = MlflowClient(config.tracking_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == str(results["register"]["version"])
    assert results["register"]["promoted"] is True
    cold = results["evaluate"]["student_int8/cold/recall_at_10"]
    assert float(champion.tags["gate.cold_recall"]) == pytest.approx(cold)


def test_worse_candidate_is_registered_but_not_promoted(pipeline_run, tmp_path):
    config, results = pipeline_run
    work_dir = tmp_path / "worse"
    shutil.copytree(config.work_dir, work_dir)
    metrics_path = work_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    # Worse by more than the gate's tolerance of standard errors.
    se = metrics["student_int8/cold/recall_at_10_se"]
    metrics["student_int8/cold/recall_at_10"] -= config.gate_tolerance_se * se + 0.01
    metrics_path.write_text(json.dumps(metrics))
    # A run of its own.
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment).experiment_id
    own = client.create_run(experiment).info.run_id
    (work_dir / "run.json").write_text(json.dumps({"run_id": own}))
    # ... and a training of its own: register reuses the version of the same
    # networks and INT8 student rather than registering them again.
    for name in ("model/lineage.json", "model/quantize.json", "eval/lineage.json"):
        stamps = json.loads((work_dir / name).read_text())
        stamps["trained"] = "another-training"
        (work_dir / name).write_text(json.dumps(stamps))

    outcome = run_step("register", config.model_copy(update={"work_dir": work_dir}))

    client = MlflowClient(config.tracking_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert outcome["promoted"] is False
    assert int(outcome["version"]) > int(results["register"]["version"])
    assert champion.version == str(results["register"]["version"])
    # It says why, in the result and on the version, naming the figure.
    (refusal,) = outcome["refused"]
    assert refusal.startswith("cold Recall@10 (INT8 student)")
    kept_out = client.get_model_version(MODEL, outcome["version"])
    assert kept_out.tags["gate.refused"] == refusal
    assert float(kept_out.tags["gate.cold_recall_se"]) == pytest.approx(se)


def test_registered_model_loads_as_pyfunc(pipeline_run):
    import mlflow.pyfunc

    config, _ = pipeline_run
    mlflow.set_tracking_uri(config.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    users = pd.read_parquet(config.work_dir / "bundle" / "users.parquet")
    known = int(users.user_id.iloc[0])
    out = model.predict(pd.DataFrame({"user_id": [known, 5]}))
    assert out.shape == (2, config.train.embedding_dim)
    assert out.iloc[0].notna().all(), "a known user gets an embedding"
    assert out.iloc[1].isna().all(), "user 5 is cold: no id embedding, NaN row"


def test_cli_rejects_unknown_config_keys(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"train": {"epochz": 3}}))
    assert main(["run", "--config", str(bad), "--work-dir", str(tmp_path / "w")]) == 2
    assert "epochz" in capsys.readouterr().err


def test_cli_names_a_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["ingest", "--data", str(missing), "--work-dir", str(tmp_path / "w")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_ingest_refuses_data_too_small_to_train_and_evaluate(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("u,i,t,r\n1,1,1,5\n1,2,2,4\n2,1,3,3\n")
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"user": "u", "item": "i", "timestamp": "t", "rating": "r"}))
    config = PipelineConfig(data=log, mapping=mapping, work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match="too little to train and evaluate"):
        run_step("ingest", config)


def test_a_step_with_another_tracking_store_says_so(tmp_path):
    from pipeline.tracking import tracked_run

    work_dir = tmp_path / "w"
    work_dir.mkdir()
    (work_dir / "run.json").write_text(json.dumps({"run_id": "0" * 32}))
    config = PipelineConfig(work_dir=work_dir, tracking_uri=f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(RuntimeError, match="use the tracking URI of its first step"):
        with tracked_run(config):
            pass


def small_log_config(tmp_path: Path, users, **train) -> PipelineConfig:
    """A run over a generic log (no user features) of 12 events per user."""
    rng = np.random.default_rng(0)
    rows = [
        (user, int(item), 1000 * user + t, int(rng.integers(1, 6)))
        for user in users
        for t, item in enumerate(rng.choice(np.arange(1, 40), 12, replace=False))
    ]
    log = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["u", "i", "t", "r"]).to_csv(log, index=False)
    mapping = tmp_path / "mapping.json"
    columns = {"user": "u", "item": "i", "timestamp": "t", "rating": "r"}
    mapping.write_text(json.dumps(columns))
    return PipelineConfig(
        data=log,
        mapping=mapping,
        work_dir=tmp_path / "w",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        train=TrainConfig(**train),
    )


def test_a_log_that_leaves_a_data_shard_without_training_rows_trains(tmp_path):
    # Nine users over eight data shards: some shards get no warm user. The
    # log has no user features either: the student reads the history alone.
    config = small_log_config(
        tmp_path, range(1, 10), max_steps=3, student_epochs=1, distill_interval=1
    )
    run_step("ingest", config)
    summary = run_step("train", config)
    assert summary["teacher_steps"] == 3 and summary["student_steps"] > 3
    run_step("quantize", config)
    metrics = run_step("evaluate", config)
    # One cold user (5): no standard error over the cold cohort, and
    # metrics.json stays strict JSON (null, not NaN).
    assert np.isnan(metrics["student_int8/cold/recall_at_10_se"])

    def refuse(constant):
        raise ValueError(f"{constant} in metrics.json")

    text = (config.work_dir / "eval" / "metrics.json").read_text()
    written = json.loads(text, parse_constant=refuse)
    assert written["student_int8/cold/recall_at_10_se"] is None
    auc = "popularity/warm/auc"
    assert written[auc] == pytest.approx(metrics[auc])


class _Rank(LocalPlacement):
    """One rank's view of the data, in this process (the sharded run itself
    is tested in test_pipeline_sharded)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def test_a_rank_whose_data_shards_hold_no_training_rows_says_so(tmp_path, capsys):
    # Users 1-9 over 8 data shards: shard 5 holds user 5 alone, who is cold.
    config = small_log_config(tmp_path, range(1, 10), max_steps=3)
    run_step("ingest", config)
    work = config.work_dir
    assert ranks_without_training_rows(work, 8, 8) == [5]
    assert ranks_without_training_rows(work, 4, 8) == []  # rank 1: shards 1, 5
    # Refused before torchrun starts, not by one rank of it.
    capsys.readouterr()
    assert main(["train", "--work-dir", str(work), "--nproc", "8"]) == 2
    err = capsys.readouterr().err
    refused = "emarec: 1 of 8 processes would have no training rows (ranks [5])"
    assert err.startswith(refused)
    assert not (work / "model" / "train_config.json").exists()
    # A rank started by hand (torchrun on several machines) says so too.
    for rank in (1, 5):
        prepared = prepare(config.work_dir, 20, shard=(rank, 8, 8))
        if rank == 1:  # users 1 and 9: something to train on
            Trainer(prepared, config.train, placement=_Rank(rank, 8))
            continue
        with pytest.raises(ValueError) as caught:
            Trainer(prepared, config.train, placement=_Rank(rank, 8))
    message = str(caught.value)
    assert message.startswith("rank 5 of 8 reads data shards [5] (user_id % 8)")
    assert "Train with fewer processes (--nproc), or in one (--nproc 0)" in message



@pytest.fixture
def small_run(tmp_path) -> PipelineConfig:
    """A small log trained, quantized and evaluated: ready to register."""
    config = small_log_config(
        tmp_path, range(1, 21), max_steps=3, student_epochs=1, distill_interval=1
    )
    for step in ("ingest", "train", "quantize", "evaluate"):
        run_step(step, config)
    return config


def test_register_refuses_parts_of_two_trainings_until_the_steps_rerun(small_run):
    config = small_run
    run_step("train", config)  # a retrain, then register straight away
    with pytest.raises(ValueError, match="student_int8.pt was quantized from"):
        run_step("register", config)
    # Nor does evaluate score the old INT8 student as this training's.
    metrics = (config.work_dir / "eval" / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match="quantized from another.*emarec quantize"):
        run_step("evaluate", config)
    assert (config.work_dir / "eval" / "metrics.json").read_bytes() == metrics
    (config.work_dir / "model" / "quantize.json").write_text("{}")  # emptied by hand
    with pytest.raises(ValueError, match="quantized from another.*emarec quantize"):
        run_step("evaluate", config)
    run_step("quantize", config)
    with pytest.raises(ValueError, match="eval/metrics.json measured other networks"):
        run_step("register", config)
    assert not (config.work_dir / "register.json").exists()
    run_step("evaluate", config)
    assert run_step("register", config)["promoted"]


def test_register_refuses_a_bundle_that_does_not_load(small_run):
    config = small_run
    (config.work_dir / "model" / "student_int8.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="does not load as the server would"):
        run_step("register", config)
    versions = MlflowClient(config.tracking_uri).search_model_versions()
    assert not versions, "nothing is registered"


def test_register_gates_at_the_k_the_metrics_were_measured_at(small_run):
    config = small_run
    run_step("evaluate", config.model_copy(update={"eval_k": 5}))
    result = run_step("register", config)  # eval_k 10 in these settings
    version = MlflowClient(config.tracking_uri).get_model_version(
        config.model_name, result["version"]
    )
    assert version.tags["gate.k"] == "5"
    metrics = json.loads((config.work_dir / "eval" / "metrics.json").read_text())
    assert result["candidate"]["cold"] == metrics["student_int8/cold/recall_at_5"]


@pytest.mark.parametrize(
    ("step", "missing", "before"),
    [
        ("quantize", "model/student.pt", "train"),
        ("evaluate", "model/space.json", "train"),
        ("register", "model/student_int8.pt", "quantize"),
    ],
)
def test_a_step_before_the_one_it_reads_says_which_to_run(
    tmp_path, step, missing, before
):
    config = small_log_config(tmp_path, range(1, 21))
    run_step("ingest", config)
    with pytest.raises(FileNotFoundError) as caught:
        run_step(step, config)
    expected = f"{config.work_dir / missing} is missing: run `emarec {before}"
    assert str(caught.value).startswith(expected)


def test_ingest_into_a_run_of_other_settings_is_refused_before_writing(tmp_path):
    config = small_log_config(tmp_path, range(1, 21))
    run_step("ingest", config)
    run_step("ingest", config)  # the same settings again: a retried task
    saved = (config.work_dir / "config.json").read_text()
    other = config.model_copy(update={"train": TrainConfig(seed=1)})
    with pytest.raises(ValueError) as caught:
        run_step("ingest", other)
    message = str(caught.value)
    refused = f"{config.work_dir} already holds a run with other settings"
    assert message.startswith(refused)
    assert "train.seed: 0 -> 1" in message
    assert (config.work_dir / "config.json").read_text() == saved


def test_the_int8_student_ranks_with_the_negative_draw_s_correction(small_run):
    from data.features import FeatureSpace
    from models.store import load_network

    folder = small_run.work_dir / "model"
    space = FeatureSpace.load(folder / "space.json")
    student = load_network(folder, "student", space)
    int8 = load_network(folder, "student_int8", space)
    assert student.config.negative_popularity == 1.0  # the default
    assert student.negative_log_ratio.abs().sum() > 0
    assert torch.equal(int8.negative_log_ratio, student.negative_log_ratio)


def test_a_step_run_with_other_settings_saves_them_for_the_steps_after_it(tmp_path):
    config = small_log_config(
        tmp_path, range(1, 21), max_steps=3, student_epochs=1, distill_interval=1
    )
    run_step("ingest", config)
    shorter = config.model_copy(
        update={"train": config.train.model_copy(update={"max_history": 5})}
    )
    run_step("train", shorter)
    saved = PipelineConfig.load(config.work_dir / "config.json")
    assert saved.train.max_history == 5, "what the networks were trained with"
    assert saved.train.distill_interval == 1, "the rest as it was"


def test_register_refuses_a_training_of_data_ingested_again_since(small_run):
    config = small_run
    run_step("ingest", config)  # the same settings: allowed, new data stamp
    with pytest.raises(ValueError, match="model/ was trained on other data than"):
        run_step("register", config)
    for step in ("train", "quantize", "evaluate"):
        run_step(step, config)
    assert run_step("register", config)["promoted"]


def test_a_cohort_without_a_click_to_rank_gives_null_not_a_crash(tmp_path):
    # Cold users' test events all rated 1: no cold test click to rank.
    config = small_log_config(
        tmp_path, range(1, 21), max_steps=3, student_epochs=1, distill_interval=1
    )
    log = pd.read_csv(config.data)
    cold_test = (log.u % 5 == 0) & (log.groupby("u").cumcount() >= 5)
    log.loc[cold_test, "r"] = 1
    log.to_csv(config.data, index=False)
    for step in ("ingest", "train", "quantize", "evaluate"):
        run_step(step, config)
    written = json.loads((config.work_dir / "eval" / "metrics.json").read_text())
    assert written["student_int8/cold/recall_at_10"] is None
    result = run_step("register", config)
    assert not result["promoted"] and "could not be measured" in result["refused"][0]


def test_a_refused_ingest_leaves_no_run_to_train_on(tmp_path):
    config = small_log_config(tmp_path, [1, 2, 3, 4, 6])  # no cold user
    with pytest.raises(ValueError, match="too little to train and evaluate"):
        run_step("ingest", config)
    assert not (config.work_dir / "config.json").exists(), "other settings may follow"
    # Nor the settings it was given: the retry must name its data again.
    again = "again with the --data \\(and --mapping\\) it was given"
    refused = f"holds an ingest that was refused.*{again}"
    with pytest.raises(FileNotFoundError, match=refused):
        run_step("train", config)


def test_the_run_summary_shows_each_model_and_the_bound(pipeline_run):
    from pipeline.summary import format_summary

    config, results = pipeline_run
    text = format_summary(config, results)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line}
    assert len(rows["student_int8"]) == 4
    # The bound has rankings only: its AUC cells say so, not NaN.
    assert rows["test_click_popularity"][0] == "n/a" and "NaN" not in text
    assert float(rows["test_click_popularity"][1]) == pytest.approx(
        results["evaluate"]["test_click_popularity/cold/recall_at_10"], abs=1e-4
    )
