"""The pipeline's MLflow run: one per pipeline run, resumed by each step."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow

from pipeline.config import PipelineConfig, local_store

logger = logging.getLogger(__name__)


def _run_file(work_dir: Path) -> Path:
    return Path(work_dir) / "run.json"


def run_id(work_dir: Path) -> str | None:
    """The MLflow run of ``work_dir`` (``run.json``), or None before its
    first step logged.

    Raises:
        ValueError: ``run.json`` is unreadable, naming it and the fix.
    """
    path = _run_file(work_dir)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("run_id")
    except (ValueError, AttributeError):  # not JSON, or not an object
        value = None
    if not isinstance(value, str) or not value.isalnum():
        raise ValueError(
            f"{path} does not hold this work dir's MLflow run id "
            '(`{"run_id": "<32 hex digits>"}`): restore it from the run in '
            "MLflow (its tag or the UI), or start again in a new --work-dir"
        )
    return value


def check_run(config: PipelineConfig, warn_missing: bool = False) -> None:
    """Refuses a tracking URI that lacks the work dir's MLflow run, before
    a step does its work rather than when it logs.

    Args:
        warn_missing: a later step of the pipeline (not a report's own
            training): without ``run.json`` beside a completed ingest, which
            logged to the run, it warns that the step starts a run of its own
            (as a copy of an ingested folder does on purpose).

    Raises:
        RuntimeError: naming the run, the URI and the fix.
        ValueError: ``run.json`` is unreadable.
    """
    existing = run_id(config.work_dir)
    ingested = Path(config.work_dir) / "ingest" / "lineage.json"
    if existing is None and warn_missing and ingested.is_file():
        logger.warning(
            "%s is missing, though %s says an ingest completed and logged to "
            "its MLflow run: this step starts a new MLflow run at %s. Restore "
            'the file (`{"run_id": "<the run\'s id in MLflow>"}`) to log to '
            "the ingest's run",
            _run_file(config.work_dir),
            ingested,
            config.tracking_uri,
        )
    if existing is None:
        return
    refused = RuntimeError(
        f"{config.work_dir} belongs to MLflow run {existing}, which "
        f"{config.tracking_uri} does not have: use the tracking URI of its "
        "first step, or a new --work-dir"
    )
    local = local_store(config.tracking_uri)
    if local is not None and not local.exists():
        raise refused  # asking MLflow would create an empty store there
    try:
        mlflow.MlflowClient(config.tracking_uri).get_run(existing)
    except mlflow.exceptions.MlflowException:
        raise refused from None


@contextmanager
def tracked_run(config: PipelineConfig) -> Iterator[mlflow.ActiveRun]:
    """Starts the pipeline's run, or resumes it if an earlier step started it."""
    check_run(config)
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_experiment(config.experiment)
    existing = run_id(config.work_dir)
    with mlflow.start_run(run_id=existing) as run:
        if existing is None:
            Path(config.work_dir).mkdir(parents=True, exist_ok=True)
            _run_file(config.work_dir).write_text(json.dumps({"run_id": run.info.run_id}))
            logger.info(
                "MLflow run %s in experiment %r at %s",
                run.info.run_id,
                config.experiment,
                config.tracking_uri,
            )
        yield run


def flatten(prefix: str, values: dict) -> dict:
    """Nested dicts as ``prefix.key`` parameters."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(name, value))
        else:
            flat[name] = value
    return flat
