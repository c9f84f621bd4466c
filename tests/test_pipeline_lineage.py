"""What a step that failed, a file that cannot be read, a register run again
and a resume with nothing to resume leave behind, on a small log and a real
MLflow store (SQLite in the test's folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.config import PipelineConfig
from pipeline.run import run_step
from tests.servers import free_port
from tests.test_pipeline_e2e import small_log_config


def small_config(tmp_path: Path) -> PipelineConfig:
    return small_log_config(
        tmp_path, range(1, 21), max_steps=3, student_epochs=1, distill_interval=1
    )


@pytest.fixture
def evaluated(tmp_path) -> PipelineConfig:
    """A small log trained, quantized and evaluated: ready to register."""
    config = small_config(tmp_path)
    for step in ("ingest", "train", "quantize", "evaluate"):
        run_step(step, config)
    return config


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> PipelineConfig:
    """The same, once for the module: tests that only read copy its folder."""
    config = small_config(tmp_path_factory.mktemp("template"))
    for step in ("ingest", "train", "quantize", "evaluate"):
        run_step(step, config)
    return config


def copy_of(template: PipelineConfig, tmp_path: Path) -> PipelineConfig:
    work_dir = shutil.copytree(template.work_dir, tmp_path / "w")
    return template.model_copy(update={"work_dir": work_dir})


def other_store(config: PipelineConfig, tmp_path: Path) -> PipelineConfig:
    """The run's settings with a tracking store that lacks its MLflow run:
    the step's MLflow logging fails."""
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    return config.model_copy(update={"tracking_uri": uri})


def versions(config: PipelineConfig) -> list[str]:
    found = MlflowClient(config.tracking_uri).search_model_versions(
        f"name='{config.model_name}'"
    )
    return sorted(v.version for v in found)


def refused_by_register(config: PipelineConfig, missing: str, step: str) -> None:
    """Register refuses the run, naming the missing stamp and the step that
    writes it again, and registers nothing."""
    with pytest.raises(ValueError) as caught:
        run_step("register", config)
    message = str(caught.value)
    assert message.startswith(f"{config.work_dir}/{missing} is missing")
    assert f"run `emarec {step} --work-dir {config.work_dir}`" in message
    assert versions(config) == []


# -- a step whose MLflow logging failed is not vouched for -----------------------


def _failing_log(*args, **kwargs):
    raise OSError("the tracking store is full")


def test_a_quantize_whose_logging_failed_is_refused_naming_quantize(
    evaluated, monkeypatch
):
    config = evaluated
    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "log_dict", _failing_log)
        with pytest.raises(OSError, match="tracking store is full"):
            run_step("quantize", config)
    # The new INT8 student is on disk, but nothing vouches for it.
    assert not (config.work_dir / "model" / "quantize.json").exists()
    again = f"run `emarec quantize --work-dir {config.work_dir}` again"
    for step in ("evaluate", "register"):
        with pytest.raises(ValueError) as caught:
            run_step(step, config)
        message = str(caught.value)
        assert message.startswith(f"{config.work_dir}/model/quantize.json is missing")
        assert again in message
    assert versions(config) == []
    run_step("quantize", config)
    run_step("evaluate", config)
    assert run_step("register", config)["promoted"]


def _failing_artifacts(*args, **kwargs):
    raise OSError("the artifact store is full")


@pytest.mark.parametrize("step", ["train", "quantize", "evaluate", "register"])
def test_a_later_step_with_another_tracking_store_is_refused_before_its_work(
    evaluated, tmp_path, step
):
    config = evaluated
    before = {
        path: path.stat().st_mtime_ns
        for path in config.work_dir.rglob("*")
        if path.is_file()
    }
    with pytest.raises(RuntimeError, match="use the tracking URI of its first step"):
        run_step(step, other_store(config, tmp_path))
    after = {
        path: path.stat().st_mtime_ns
        for path in config.work_dir.rglob("*")
        if path.is_file()
    }
    assert after == before  # nothing written, nothing removed
    # Nor an empty store where the other URI points.
    assert not (tmp_path / "other.db").exists()
    assert run_step("register", config)["promoted"]


def test_an_evaluate_whose_logging_failed_is_refused_naming_evaluate(
    evaluated, monkeypatch
):
    config = evaluated
    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "log_artifacts", _failing_artifacts)
        with pytest.raises(OSError, match="artifact store is full"):
            run_step("evaluate", config)
    # metrics.json is rewritten, but the stamp that vouched for the last one
    # is gone and no new one was written.
    assert (config.work_dir / "eval" / "metrics.json").is_file()
    assert not (config.work_dir / "eval" / "lineage.json").exists()
    refused_by_register(config, "eval/lineage.json", "evaluate")
    run_step("evaluate", config)
    assert run_step("register", config)["promoted"]


def test_a_quantize_that_succeeds_logs_its_stamp_and_writes_it_last(
    evaluated, tmp_path
):
    config = evaluated
    info = run_step("quantize", config)
    written = json.loads((config.work_dir / "model" / "quantize.json").read_text())
    assert written["quantized"] == info["quantized"]
    run_id = json.loads((config.work_dir / "run.json").read_text())["run_id"]
    client = MlflowClient(config.tracking_uri)
    logged = client.download_artifacts(run_id, "model/quantize.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["quantized"] == info["quantized"]
    assert not list((config.work_dir / "model").glob("*.tmp"))


# -- a file that cannot be read names itself and the step that rewrites it --------

NOT_JSON = "{'trained': "
# The steps a file's own step makes stale, as the error names them.
THEN = {
    "ingest": ", then train, quantize and evaluate",
    "train": ", then quantize and evaluate",
    "quantize": ", then evaluate",
    "evaluate": "",
}
UNREADABLE = {
    "model/quantize.json": [
        (NOT_JSON, "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"quantized": 7}', "has 'quantized' 7, not a stamp"),
    ],
    "eval/metrics.json": [
        (NOT_JSON, "is not valid JSON"),
        ("{}", "has no 'student_int8/cold/recall_at_10'"),
        ('{"a/warm/auc": "high"}', "has 'a/warm/auc' 'high', not a figure"),
    ],
    "eval/lineage.json": [
        ("", "is not valid JSON"),
        ('{"trained": null, "quantized": null, "eval_k": "10"}', "has 'eval_k' '10'"),
    ],
    "model/lineage.json": [
        (NOT_JSON, "is not valid JSON"),
        ("{}", "has no 'trained' stamp"),
    ],
    "ingest/lineage.json": [("null", "holds a JSON NoneType, not an object")],
    "model/train_summary.json": [
        ('{"teacher_steps": 3}', "has no count of student_steps"),
    ],
}
STEP_OF = {
    "model/quantize.json": "quantize",
    "eval/metrics.json": "evaluate",
    "eval/lineage.json": "evaluate",
    "model/lineage.json": "train",
    "ingest/lineage.json": "ingest",
    "model/train_summary.json": "train",
}


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [(name, *case) for name, cases in UNREADABLE.items() for case in cases],
)
def test_an_unreadable_file_names_itself_and_the_step_that_rewrites_it(
    template, tmp_path, name, content, problem
):
    config = copy_of(template, tmp_path)
    path = config.work_dir / name
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        run_step("register", config)
    step = STEP_OF[name]
    rewrite = f"run `emarec {step} --work-dir {config.work_dir}` again to rewrite it"
    message = str(caught.value)
    assert message.startswith(f"{path} {problem}")
    assert message.endswith(rewrite + THEN[step])
    assert versions(config) == []


def test_evaluate_names_an_unreadable_quantize_json_before_its_work(
    template, tmp_path, capsys
):
    config = copy_of(template, tmp_path)
    (config.work_dir / "model" / "quantize.json").write_text(NOT_JSON)
    capsys.readouterr()
    assert main(["evaluate", "--work-dir", str(config.work_dir)]) == 2
    err = capsys.readouterr().err
    path = config.work_dir / "model" / "quantize.json"
    assert err.startswith(f"emarec: {path} is not valid JSON")
    # Refused before its work: the last evaluation still stands as it was.
    assert (config.work_dir / "eval" / "lineage.json").is_file()


def test_train_names_an_unreadable_ingest_stamp_before_training(tmp_path):
    config = small_config(tmp_path)
    run_step("ingest", config)
    path = config.work_dir / "ingest" / "lineage.json"
    path.write_text(NOT_JSON)
    with pytest.raises(ValueError) as caught:
        run_step("train", config)
    assert str(caught.value).startswith(f"{path} is not valid JSON")
    assert not (config.work_dir / "model" / "student.pt").exists()


# -- register run again reuses the version of the same model ----------------------


def test_register_run_twice_reuses_the_version(evaluated):
    config = evaluated
    first = run_step("register", config)
    second = run_step("register", config)
    assert first["promoted"] and not first["reused"]
    assert second["reused"] and second["promoted"]
    assert second["version"] == first["version"]
    assert versions(config) == [first["version"]]
    client = MlflowClient(config.tracking_uri)
    champion = client.get_model_version_by_alias(config.model_name, "champion")
    assert champion.version == first["version"]
    trained = json.loads((config.work_dir / "model" / "lineage.json").read_text())
    assert champion.tags["lineage.trained"] == trained["trained"]


def test_a_register_stopped_after_registering_is_completed_by_its_retry(
    evaluated, monkeypatch
):
    config = evaluated
    tag = MlflowClient.set_model_version_tag

    def unreachable(self, name, version, key, value):
        raise mlflow.exceptions.MlflowException("the tracking server went away")

    # The version is created, then MLflow fails before its tags and alias.
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_model_version_tag", unreachable)
        with pytest.raises(mlflow.exceptions.MlflowException, match="went away"):
            run_step("register", config)
    assert MlflowClient.set_model_version_tag is tag
    (registered,) = versions(config)
    retried = run_step("register", config)
    assert retried["reused"] and retried["promoted"]
    assert versions(config) == [registered] == [retried["version"]]
    version = MlflowClient(config.tracking_uri).get_model_version(
        config.model_name, registered
    )
    assert version.aliases == ["champion"]
    assert "gate.cold_recall" in version.tags


def test_a_refused_version_registered_again_is_reused_and_still_refused(evaluated):
    config = evaluated
    champion = run_step("register", config)["version"]
    # Another training of the same run, with a cold figure far below.
    for step in ("train", "quantize", "evaluate"):
        run_step(step, config)
    path = config.work_dir / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["student_int8/cold/recall_at_10"] = -1.0
    path.write_text(json.dumps(metrics))
    first = run_step("register", config)
    second = run_step("register", config)
    assert not first["promoted"] and not second["promoted"]
    assert second["reused"] and second["version"] == first["version"] != champion
    assert second["refused"] == first["refused"]
    assert second["refused"][0].startswith("cold Recall@10 (INT8 student)")
    assert versions(config) == sorted([champion, first["version"]])
    client = MlflowClient(config.tracking_uri)
    alias = client.get_model_version_by_alias(config.model_name, "champion")
    assert alias.version == champion
    kept_out = client.get_model_version(config.model_name, first["version"])
    assert kept_out.tags["gate.refused"] == "; ".join(second["refused"])


# -- a resume with nothing to resume from is refused -----------------------------


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        ([], "none (train.checkpoint_every is 0: --checkpoint-every writes them)"),
        (["--checkpoint-every", "10"], "none (the run stopped before its first"),
        (["--checkpoint-every", "10", "--incomplete"], "only incomplete ones"),
        (["--nproc", "2"], "none (train.checkpoint_every is 0"),
    ],
)
def test_a_resume_without_a_checkpoint_is_refused_before_training(
    tmp_path, capsys, flags, why
):
    config = small_config(tmp_path)
    run_step("ingest", config)
    work = config.work_dir
    checkpoints = work / "model" / "checkpoints"
    if "--incomplete" in flags:  # stopped while writing its first checkpoint
        flags = [f for f in flags if f != "--incomplete"]
        (checkpoints / "step-00000010").mkdir(parents=True)
    capsys.readouterr()
    assert main(["train", "--work-dir", str(work), *flags, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"emarec: --resume: {checkpoints} holds no complete checkpoint to resume from"
    )
    assert why in err
    assert "Drop --resume to train this run from the start" in err
    assert not (work / "model" / "student.pt").exists()
    assert not (work / "model" / "train_config.json").exists()


# -- a train or an ingest that did not complete vouches for nothing -------------


def test_a_train_that_failed_after_saving_its_networks_is_refused_naming_train(
    evaluated, monkeypatch
):
    from pipeline.train import Trainer

    config = evaluated
    save = Trainer.save

    def save_then_fail(self, folder):
        save(self, folder)
        raise OSError("disk full after the networks")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", save_then_fail)
        with pytest.raises(OSError, match="disk full"):
            run_step("train", config)
    # New networks beside the old quantize and evaluate stamps: the old
    # training's stamp no longer vouches for them.
    assert (config.work_dir / "model" / "student.pt").is_file()
    assert not (config.work_dir / "model" / "lineage.json").exists()
    refused_by_register(config, "model/lineage.json", "train")


def test_a_repeated_ingest_that_is_refused_leaves_no_ingest_to_train_on(tmp_path):
    config = small_config(tmp_path)
    run_step("ingest", config)
    ingest = config.work_dir / "ingest"
    assert (ingest / "summary.json").is_file() and (ingest / "lineage.json").is_file()
    # The same file, now without a cold user: refused as too little to evaluate.
    log = Path(config.data)
    frame = pd.read_csv(log)
    frame[frame.u % 5 != 0].to_csv(log, index=False)
    with pytest.raises(ValueError, match="too little to train and evaluate"):
        run_step("ingest", config)
    assert not (ingest / "summary.json").exists()
    assert not (ingest / "lineage.json").exists()
    with pytest.raises(FileNotFoundError, match="holds an ingest that was refused"):
        run_step("train", config)


def test_an_ingest_whose_logging_failed_leaves_no_ingest_to_train_on(
    tmp_path, monkeypatch
):
    config = small_config(tmp_path)

    def failing(*args, **kwargs):
        raise OSError("tracking store is full")

    with monkeypatch.context() as patch:
        patch.setattr(mlflow, "log_metrics", failing)
        with pytest.raises(OSError, match="tracking store is full"):
            run_step("ingest", config)
    ingest = config.work_dir / "ingest"
    assert (ingest / "interactions.parquet").is_file()
    assert not (ingest / "summary.json").exists()
    assert not (ingest / "lineage.json").exists()
    with pytest.raises(FileNotFoundError, match="holds an ingest that was refused"):
        run_step("train", config)
    run_step("ingest", config)  # the same settings again: accepted
    assert (ingest / "lineage.json").is_file()


def test_train_from_the_command_line_saves_its_settings_for_the_steps_after_it(
    tmp_path,
):
    config = small_config(tmp_path)
    run_step("ingest", config)
    override = tmp_path / "longer.json"
    override.write_text(json.dumps({"train": {"max_history": 7}}))
    work = str(config.work_dir)
    assert main(["train", "--work-dir", work, "--config", str(override)]) == 0
    saved = PipelineConfig.load(config.work_dir / "config.json")
    assert saved.train.max_history == 7
    assert saved.train.max_steps == config.train.max_steps
    # Train still checks its input: without an ingest it names the step.
    fresh = str(tmp_path / "empty")
    assert main(["train", "--work-dir", fresh, "--config", str(override)]) == 2


def test_a_refused_register_leaves_no_result_of_an_earlier_one(evaluated):
    config = evaluated
    assert run_step("register", config)["promoted"]
    result = config.work_dir / "register.json"
    assert result.is_file()
    (config.work_dir / "eval" / "lineage.json").unlink()  # an evaluate cut short
    with pytest.raises(ValueError, match="eval/lineage.json is missing"):
        run_step("register", config)
    assert not result.exists()


def test_an_ingest_without_data_saves_the_data_it_found(tmp_path, monkeypatch):
    config = small_config(tmp_path)
    first = Path(config.data)
    other = tmp_path / "other.csv"
    shutil.copy(first, other)
    monkeypatch.setenv("EMAREC_DATA", str(first))
    found = config.model_copy(update={"data": None})
    run_step("ingest", found)
    saved = PipelineConfig.load(config.work_dir / "config.json")
    assert saved.data == first.resolve()
    # A retry that would now find other data is refused, not run on it ...
    monkeypatch.setenv("EMAREC_DATA", str(other))
    with pytest.raises(ValueError, match="already holds a run with other settings"):
        run_step("ingest", found)
    # ... and naming the data it found is the same run again.
    monkeypatch.delenv("EMAREC_DATA")
    run_step("ingest", config)


def test_steps_not_told_the_data_read_the_one_ingest_found(tmp_path, monkeypatch):
    # As `emarec run` without --data, and the weekly DAG without its param, do.
    config = small_config(tmp_path)
    monkeypatch.setenv("EMAREC_DATA", str(config.data))
    found = config.model_copy(update={"data": None})
    run_step("ingest", found)
    run_step("train", found)
    saved = PipelineConfig.load(config.work_dir / "config.json")
    assert saved.data == Path(config.data).resolve()
    # Before, train saved `data: null` and the same run again was refused.
    run_step("ingest", found)


def test_a_first_ingest_whose_tracking_server_is_down_can_be_retried(
    tmp_path, monkeypatch, capsys
):
    config = small_config(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["ingest", "--work-dir", str(config.work_dir), "--data", str(config.data)]
    args += ["--mapping", str(config.mapping)]
    capsys.readouterr()
    assert main([*args, "--tracking-uri", down]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emarec: MLflow failed: API request to {down}")
    assert "Traceback" not in err and "server is up" in err
    assert not (config.work_dir / "config.json").exists()
    # The fixed URI is a first ingest again, not a run of other settings.
    assert main([*args, "--tracking-uri", config.tracking_uri]) == 0


def test_an_ingest_again_from_the_saved_settings_finds_its_data_anew(
    tmp_path, monkeypatch, capsys
):
    config = small_config(tmp_path)
    run_step("ingest", config)
    work = ["ingest", "--work-dir", str(config.work_dir)]
    assert main(work) == 0  # the saved settings, and no EMAREC_DATA: the same run
    other = tmp_path / "other.csv"
    shutil.copy(config.data, other)
    monkeypatch.setenv("EMAREC_DATA", str(other))
    capsys.readouterr()
    # Before, the saved data was ingested again and EMAREC_DATA ignored.
    assert main(work) == 2
    err = capsys.readouterr().err
    assert "already holds a run with other settings (data: " in err
    assert str(other) in err
    monkeypatch.setenv("EMAREC_DATA", str(config.data))
    assert main(work) == 0


@pytest.mark.parametrize("text", ["{oops", "[]", '{"run_id": 7}', '{"run": "x"}'])
def test_an_unreadable_run_json_names_itself(template, tmp_path, capsys, text):
    config = copy_of(template, tmp_path)
    (config.work_dir / "run.json").write_text(text)
    capsys.readouterr()
    assert main(["evaluate", "--work-dir", str(config.work_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emarec: {config.work_dir / 'run.json'} does not hold")
    assert "new --work-dir" in err


def test_a_finished_run_refuses_resume_and_other_settings_are_named(
    tmp_path, capsys
):
    config = small_log_config(
        tmp_path,
        range(1, 21),
        epochs=30,
        max_steps=30,
        student_epochs=1,
        distill_interval=1,
        sync_interval=1,
        checkpoint_every=10,
    )
    run_step("ingest", config)
    run_step("train", config)
    checkpoints = sorted((config.work_dir / "model" / "checkpoints").glob("step-*"))
    finished = checkpoints[-1]
    capsys.readouterr()
    assert main(["train", "--work-dir", str(config.work_dir), "--resume"]) == 2
    assert f"{finished} is the end of a finished run" in capsys.readouterr().err
    shutil.rmtree(finished)  # as if the run died before its end
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({"train": {"embedding_dim": 16}}))
    work = str(config.work_dir)
    capsys.readouterr()
    args = ["train", "--work-dir", work, "--resume", "--config", str(wider)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emarec: {checkpoints[-2]} was written by networks of")
    assert "teacher.embedding_dim: 32 -> 16" in err
    assert "drop --resume" in err
    # The refused settings are not recorded as the run's latest.
    run_id = json.loads((config.work_dir / "run.json").read_text())["run_id"]
    tags = MlflowClient(config.tracking_uri).get_run(run_id).data.tags
    assert not [tag for tag in tags if tag.startswith("latest.")], tags
    # The same settings resume.
    assert main(["train", "--work-dir", work, "--resume"]) == 0


@pytest.mark.parametrize(
    "deleted, step, names",
    [
        ("ingest/lineage.json", "train", "holds an ingest that was refused"),
        ("ingest/summary.json", "train", "holds an ingest that was refused"),
        ("model/lineage.json", "quantize", "model/lineage.json is missing"),
        ("model/lineage.json", "evaluate", "model/lineage.json is missing"),
    ],
)
def test_a_stamp_deleted_by_hand_is_refused_before_the_work(
    template, tmp_path, deleted, step, names
):
    config = copy_of(template, tmp_path)
    (config.work_dir / deleted).unlink()
    before = sorted(p for p in config.work_dir.rglob("*") if p.is_file())
    with pytest.raises((ValueError, FileNotFoundError), match=names):
        run_step(step, config)
    assert sorted(p for p in config.work_dir.rglob("*") if p.is_file()) == before


def test_an_unreadable_ingest_summary_names_itself(template, tmp_path):
    config = copy_of(template, tmp_path)
    (config.work_dir / "ingest" / "summary.json").write_text("garbage{")
    with pytest.raises(ValueError, match="ingest/summary.json is not valid JSON"):
        run_step("train", config)


def test_a_register_refused_before_its_checks_leaves_no_earlier_result(
    evaluated, tmp_path
):
    config = evaluated
    run_step("register", config)
    with pytest.raises(RuntimeError, match="use the tracking URI"):
        run_step("register", other_store(config, tmp_path))
    assert not (config.work_dir / "register.json").exists()


def test_a_step_without_run_json_warns_that_it_starts_a_run_of_its_own(
    template, tmp_path, caplog
):
    config = copy_of(template, tmp_path)
    (config.work_dir / "run.json").unlink()
    with caplog.at_level("WARNING", logger="pipeline.tracking"):
        run_step("quantize", config)
    [warning] = [r.getMessage() for r in caplog.records if "run.json" in r.getMessage()]
    assert warning.startswith(f"{config.work_dir / 'run.json'} is missing")
    assert "starts a new MLflow run" in warning
    assert (config.work_dir / "run.json").is_file()
