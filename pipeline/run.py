"""The whole batch pipeline in one process: ingest, train, quantize, evaluate,
register. Each step reads what the previous one wrote under ``work_dir``, so
the Airflow DAG can run them as separate tasks."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from data.locate import resolve_data
from pipeline.config import PipelineConfig
from pipeline.evaluate import run_evaluate
from pipeline.ingest import drop_stamps, ingest_dir, run_ingest
from pipeline.quantize import run_quantize
from pipeline.register import run_register
from pipeline.tracking import check_run, flatten, tracked_run
from pipeline.train import run_train

logger = logging.getLogger(__name__)

STEPS = {
    "ingest": run_ingest,
    "train": run_train,
    "quantize": run_quantize,
    "evaluate": run_evaluate,
    "register": run_register,
}


# What each step reads that an earlier step writes, under work_dir.
NEEDS = {
    "quantize": (("model/student.pt", "train"),),
    "evaluate": (("model/space.json", "train"),),
    "register": (
        ("model/student_int8.pt", "quantize"),
        ("eval/metrics.json", "evaluate"),
    ),
}


def check_ready(name: str, work_dir: Path) -> None:
    """Refuses a step whose input an earlier step has not written yet.

    Raises:
        FileNotFoundError: naming the missing file and the step to run.
    """
    for needed, step in NEEDS.get(name, ()):
        if not (Path(work_dir) / needed).is_file():
            raise FileNotFoundError(
                f"{Path(work_dir) / needed} is missing: run `emarec {step} "
                f"--work-dir {work_dir}` before {name}"
            )


def check_fresh(config: PipelineConfig) -> None:
    """Refuses to ingest into a work dir that holds a run of other settings:
    its MLflow run keeps the first values, and its model would sit beside
    other data. The same settings again (a retried task) are fine.

    Raises:
        ValueError: naming the settings that differ.
    """
    saved = Path(config.work_dir) / "config.json"
    if not saved.is_file():
        return
    changed = changed_settings(PipelineConfig.load(saved), config)
    if changed:
        raise ValueError(
            f"{config.work_dir} already holds a run with other settings "
            f"({changed}): ingest into a new --work-dir, or run the later steps "
            "on this one"
        )


def changed_settings(before: PipelineConfig, now: PipelineConfig) -> str:
    """The settings that differ, as ``key: old -> new`` (at most five
    shown), or ``""``; paths compare by the file they name."""
    old, new = (
        flatten("", c.anchored().model_dump(mode="json")) for c in (before, now)
    )
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return shown + more


def run_step(name: str, config: PipelineConfig, **options) -> dict:
    """Runs one step. Ingest records the run's settings; a later step run
    with other settings (a ``--config`` or flags over the saved ones) records
    its own once it succeeds, so the steps after it read what it used.

    Args:
        options: passed to the step (``resume`` for train).
    """
    check_ready(name, config.work_dir)
    if name == "register":  # a refused register leaves no earlier result
        (Path(config.work_dir) / "register.json").unlink(missing_ok=True)
    if name != "ingest":  # ingest refuses another tracking URI as other settings
        check_run(config, warn_missing=True)
    saved = Path(config.work_dir) / "config.json"
    fresh = name == "ingest" and not saved.is_file()
    if name != "ingest" and config.data is None and saved.is_file():
        # The data the run's ingest found (it saves what it found): a later
        # step that was not told it reads it from there, not as other data.
        config = config.model_copy(update={"data": PipelineConfig.load(saved).data})
    if name == "ingest" and config.data is None:
        # Saved as found (EMAREC_DATA, the shared copy, the download): a
        # retry that would find other data is refused, not run on it.
        config = config.model_copy(update={"data": resolve_data(None).resolve()})
    if name == "ingest":
        check_fresh(config)
        config.work_dir.mkdir(parents=True, exist_ok=True)
        config.save(saved)
    try:
        result = STEPS[name](config, **options)
    except Exception:
        if fresh:  # a refused first ingest holds no run: other settings may follow
            saved.unlink(missing_ok=True)
        raise
    changed = saved.is_file() and changed_settings(PipelineConfig.load(saved), config)
    if changed:
        logger.warning(
            "%s ran with other settings than %s (%s): saved there for the "
            "steps after it",
            name,
            saved,
            changed,
        )
        config.save(saved)
    if name == "ingest":
        try:
            with tracked_run(config):
                mlflow.log_params(
                    flatten("", config.model_dump(mode="json", exclude={"train"}))
                )
                counts = flatten("", {k: v for k, v in result.items() if k != "source"})
                mlflow.log_metrics({f"ingest/{k}": float(v) for k, v in counts.items()})
        except Exception:
            # An ingest whose run was not logged is not done: later steps
            # refuse its data until one completes. A first one leaves no
            # settings either, so that it may be retried with others (another
            # tracking URI, say).
            drop_stamps(ingest_dir(config.work_dir))
            if fresh:
                saved.unlink(missing_ok=True)
            raise
    return result


def run_pipeline(config: PipelineConfig) -> dict:
    """Runs every step in order; returns each step's result by name."""
    return {name: run_step(name, config) for name in STEPS}
