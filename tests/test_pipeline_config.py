"""pipeline.config and the CLI's config building: impossible values are refused
with a message naming where they came from, the field, the range and the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, PipelineConfig, TrainConfig
from pipeline.schedule import config_for_run


def write_config(path: Path, train: dict) -> Path:
    path.write_text(json.dumps({"train": train}))
    return path


def refusal(tmp_path: Path, train: dict) -> tuple[Path, str]:
    """The config file of these training settings, and why it is refused."""
    path = write_config(tmp_path / "config.json", train)
    with pytest.raises(ConfigError) as caught:
        PipelineConfig.from_file(path)
    return path, str(caught.value)


def bounded_fields() -> list[tuple[str, dict]]:
    """Every TrainConfig field declared with bounds, with those bounds."""
    fields = []
    for name, field in TrainConfig.model_fields.items():
        bounds = {
            op: getattr(bound, op)
            for bound in field.metadata
            for op in ("ge", "gt", "le", "lt")
            if hasattr(bound, op)
        }
        if bounds:
            fields.append((name, bounds))
    return fields


def outside(bounds: dict) -> list[float]:
    """Values just outside each declared bound."""
    values = []
    if "ge" in bounds:
        values.append(bounds["ge"] - 1)
    if "gt" in bounds:
        values.append(bounds["gt"])
    if "le" in bounds:
        values.append(bounds["le"] + 1)
    if "lt" in bounds:
        values.append(bounds["lt"])
    return values


BOUNDED = bounded_fields()


@pytest.mark.parametrize(("name", "bounds"), BOUNDED, ids=[n for n, _ in BOUNDED])
def test_every_bounded_field_refuses_values_outside_with_its_range(
    tmp_path: Path, name: str, bounds: dict
) -> None:
    field = TrainConfig.model_fields[name]
    assert field.description, f"train.{name} needs a description for its message"
    for value in outside(bounds):
        path = write_config(tmp_path / "config.json", {name: value})
        with pytest.raises(ConfigError) as caught:
            PipelineConfig.from_file(path)
        message = str(caught.value)
        expected = f"{path}: field 'train.{name}' is {value!r}; it must be"
        assert message.startswith(expected)
        assert field.description in message
        if field.default is None:  # not set by default: no value to suggest
            assert "or leave it out (the default: not set)" in message
            assert "e.g. the default None" not in message
        else:
            assert f"e.g. the default {field.default!r}" in message
        assert "Input should" not in message, "no raw pydantic wording"


@pytest.mark.parametrize("value", [1, 1.5, 0, -0.5, 0.5, "abc", math.nan, math.inf])
def test_ema_decay_out_of_range_says_the_range_and_why(
    tmp_path: Path, value: object
) -> None:
    path = tmp_path / "config.yaml"
    yaml_value = {math.nan: ".nan", math.inf: ".inf"}.get(value, value)
    path.write_text(f"train:\n  ema_decay: {yaml_value}\n")
    with pytest.raises(ConfigError) as caught:
        PipelineConfig.from_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: field 'train.ema_decay' is ")
    assert "it must be in [0.9, 1)" in message
    assert "at 1 the average never moves" in message
    assert "typical values are 0.99 to 0.9999" in message
    assert "e.g. the default 0.995" in message


def test_ema_decay_that_is_not_a_number_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", {"ema_decay": "high"})
    with pytest.raises(ConfigError, match="'train.ema_decay' is 'high', not a number"):
        PipelineConfig.from_file(path)


def test_valid_edges_are_accepted(tmp_path: Path) -> None:
    train = {"ema_decay": 0.9, "cold_history_share": 1.0, "epochs": 1, "batch_size": 8}
    config = PipelineConfig.from_file(write_config(tmp_path / "c.json", train))
    assert config.train.model_dump(include=set(train)) == train


def test_student_ema_decay_is_off_or_an_average(tmp_path: Path) -> None:
    path, message = refusal(tmp_path, {"student_ema_decay": 0.5})
    assert message.startswith(f"{path}: field 'train.student_ema_decay'")
    assert "use 0 (off)" in message and "0.999" in message
    for value in (0.0, 0.9, 0.999):
        path = write_config(tmp_path / "ok.json", {"student_ema_decay": value})
        assert PipelineConfig.from_file(path).train.student_ema_decay == value


def test_feedback_shares_of_the_same_rows_must_not_add_up_past_one(
    tmp_path: Path,
) -> None:
    train = {"unknown_feedback_share": 0.7, "clicks_only_feedback_share": 0.5}
    path, message = refusal(tmp_path, train)
    assert message.startswith(f"{path}: field 'train.unknown_feedback_share'")
    assert "clicks_only_feedback_share 0.5" in message and "more than 1" in message
    train["clicks_only_feedback_share"] = 0.3
    config = PipelineConfig.from_file(write_config(tmp_path / "ok.json", train))
    assert config.train.unknown_feedback_share == 0.7


def test_every_problem_is_listed_one_per_line(tmp_path: Path) -> None:
    train = {"epochs": -1, "batch_size": 0, "lr": 0, "cold_history_share": 1.5}
    path = write_config(tmp_path / "config.json", train)
    with pytest.raises(ConfigError) as caught:
        PipelineConfig.from_file(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == len(train)
    for name in train:
        assert any(f"field 'train.{name}'" in line for line in lines), name


def test_unknown_key_lists_the_keys_and_the_closest(tmp_path: Path) -> None:
    path, message = refusal(tmp_path, {"ema_decy": 0.99})
    assert message.startswith(f"{path}: unknown key 'train.ema_decy'")
    assert ", ".join(TrainConfig.model_fields) in message
    assert "(did you mean 'ema_decay'?)" in message


def test_cli_names_the_flag_that_set_an_impossible_value(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = write_config(tmp_path / "config.json", {"epochs": 2})
    argv = ["ingest", "--config", str(config), "--epochs", "0"]
    assert main([*argv, "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emarec: --epochs: field 'train.epochs' is 0; it must be at")
    assert str(config) not in err, "the file's value was valid; the flag's was not"
    assert not (tmp_path / "w").exists(), "nothing runs on an invalid config"


def test_cli_names_the_config_file_of_an_impossible_value(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = write_config(tmp_path / "config.json", {"ema_decay": 1.0})
    argv = ["ingest", "--config", str(config), "--work-dir", str(tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emarec: {config}: field 'train.ema_decay' is 1.0;")


def test_dag_params_with_an_impossible_value_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the DAG run's params: field 'train.epochs'"):
        config_for_run({"epochs": 0, "work_root": str(tmp_path)}, "manual")


def test_dag_params_set_the_gate_tolerance(tmp_path):
    config = config_for_run({"gate_tolerance_se": 0, "work_root": str(tmp_path)}, "")
    assert config.gate_tolerance_se == 0
    default = config_for_run({"work_root": str(tmp_path)}, "manual")
    assert default.gate_tolerance_se == 2.0
    with pytest.raises(ConfigError, match="field 'gate_tolerance_se' is -1"):
        config_for_run({"gate_tolerance_se": -1, "work_root": str(tmp_path)}, "")


def test_dag_params_can_shard_the_train_step(tmp_path):
    config = config_for_run({"nproc": 2, "work_root": str(tmp_path)}, "manual")
    assert config.train.nproc == 2
    with pytest.raises(ConfigError, match="nproc 3 must divide data_shards 8"):
        config_for_run({"nproc": 3, "work_root": str(tmp_path)}, "manual")


@pytest.mark.parametrize(
    ("flag", "value", "starts", "says"),
    [
        (
            "--nproc",
            "3",
            "emarec: --nproc: field 'train.nproc': nproc 3 must divide",
            "Use one of [1, 2, 4, 8]",
        ),
        (
            "--checkpoint-every",
            "15",
            "emarec: --checkpoint-every: field 'train.checkpoint_every'",
            "must be a multiple of distill_interval 10",
        ),
    ],
)
def test_cli_names_the_flag_of_a_value_that_conflicts_with_another(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag, value, starts, says
) -> None:
    argv = ["ingest", flag, value, "--work-dir", str(tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(starts)
    assert says in err


NUMBERS = [
    name
    for name, field in TrainConfig.model_fields.items()
    if field.annotation in (int, float, int | None)
]


@pytest.mark.parametrize("name", NUMBERS)
def test_a_yes_or_no_is_no_number(tmp_path: Path, name: str) -> None:
    # YAML reads `true` as a bool, which pydantic would take for 1.
    path = tmp_path / "config.yaml"
    path.write_text(f"train:\n  {name}: true\n")
    with pytest.raises(ConfigError) as caught:
        PipelineConfig.from_file(path)
    expected = f"{path}: field 'train.{name}': true is a yes or no, not a number"
    assert str(caught.value).startswith(expected)


def test_a_yes_or_no_stays_one_for_a_switch(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("gate_tolerance_se: false\ntrain:\n  background_sync: false\n")
    with pytest.raises(ConfigError, match="'gate_tolerance_se': false is a yes or no"):
        PipelineConfig.from_file(path)
    path.write_text("train:\n  background_sync: false\n  epochs: 2\n")
    config = PipelineConfig.from_file(path)
    assert config.train.background_sync is False and config.train.epochs == 2


def parsed(argv: list[str]):
    from pipeline.cli import make_parser

    return make_parser().parse_args(argv)


def test_a_later_step_lays_its_config_file_over_the_run_s_settings(tmp_path: Path):
    from pipeline.cli import build_config

    work = tmp_path / "w"
    work.mkdir()
    first = {"eval_k": 5, "train": {"epochs": 2, "seed": 3, "embedding_dim": 16}}
    PipelineConfig.validated(first, "first").save(work / "config.json")
    later = write_config(tmp_path / "later.json", {"seed": 4})
    argv = ["--work-dir", str(work), "--config", str(later), "--epochs", "1"]
    config = build_config(parsed(["evaluate", *argv]))
    assert (config.eval_k, config.train.embedding_dim) == (5, 16), "kept from the run"
    assert (config.train.seed, config.train.epochs) == (4, 1), "file, then flag"
    # A new run starts from the file alone.
    fresh = build_config(parsed(["run", *argv]))
    assert (fresh.eval_k, fresh.train.embedding_dim, fresh.train.seed) == (10, 32, 4)


def test_a_later_step_names_the_file_of_its_impossible_value(tmp_path: Path):
    from pipeline.cli import build_config

    work = tmp_path / "w"
    work.mkdir()
    PipelineConfig(train=TrainConfig(data_shards=6)).save(work / "config.json")
    # Valid alone (the default data_shards is 8), not with the run's 6.
    later = write_config(tmp_path / "later.json", {"nproc": 4})
    PipelineConfig.from_file(later)
    argv = ["quantize", "--work-dir", str(work), "--config", str(later)]
    with pytest.raises(ConfigError) as caught:
        build_config(parsed(argv))
    assert str(caught.value).startswith(f"{later}: field 'train.nproc'")


def test_a_later_step_s_config_file_is_checked_with_the_run_s_settings(tmp_path):
    from pipeline.cli import build_config

    work = tmp_path / "w"
    work.mkdir()
    run = TrainConfig(distill_interval=5, sync_interval=5)
    PipelineConfig(train=run).save(work / "config.json")
    # Impossible alone (the default intervals are 10), fine with the run's 5.
    later = write_config(tmp_path / "later.json", {"checkpoint_every": 15})
    with pytest.raises(ConfigError):
        PipelineConfig.from_file(later)
    argv = ["train", "--work-dir", str(work), "--config", str(later)]
    config = build_config(parsed(argv))
    assert (config.train.checkpoint_every, config.train.distill_interval) == (15, 5)


def test_the_cli_saves_paths_a_step_run_elsewhere_still_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.cli import build_config

    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    argv = ["ingest", "--data", "logs/a.csv", "--work-dir", "runs/a"]
    config = build_config(parsed([*argv, "--tracking-uri", "sqlite:///m.db"]))
    assert config.data == tmp_path / "logs" / "a.csv"
    assert config.work_dir == tmp_path / "runs" / "a"
    assert config.tracking_uri == f"sqlite:///{tmp_path / 'm.db'}"
    # Spelled another way from another directory: the same paths.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    other = ["ingest", "--data", "../x/../logs/a.csv", "--work-dir", "../runs/a"]
    again = build_config(parsed([*other, "--tracking-uri", "sqlite:///../m.db"]))
    assert again == config
    monkeypatch.chdir(tmp_path)
    folder = build_config(parsed([*argv, "--tracking-uri", "mlruns"]))
    assert folder.tracking_uri == str(tmp_path / "mlruns")
    for server in ("http://127.0.0.1:5000", "databricks", f"sqlite:///{tmp_path}/x.db"):
        kept = build_config(parsed([*argv, "--tracking-uri", server]))
        assert kept.tracking_uri == server


def test_a_later_step_finds_the_run_through_the_work_dir_its_file_names(tmp_path):
    from pipeline.cli import build_config

    work = tmp_path / "w"
    work.mkdir()
    PipelineConfig(train=TrainConfig(max_history=8)).save(work / "config.json")
    later = tmp_path / "later.json"
    later.write_text(json.dumps({"work_dir": str(work), "eval_k": 5}))
    config = build_config(parsed(["evaluate", "--config", str(later)]))
    assert (config.train.max_history, config.eval_k) == (8, 5)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a mapping of settings"),
        (json.dumps({"train": {"epochs": 0}}), "field 'train.epochs' is 0"),
    ],
)
def test_a_broken_saved_config_names_its_file_and_field(
    tmp_path, capsys, text, expected
):
    work = tmp_path / "w"
    work.mkdir()
    (work / "config.json").write_text(text)
    assert main(["evaluate", "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emarec: {work / 'config.json'}")
    assert expected in err
    assert "Traceback" not in err
