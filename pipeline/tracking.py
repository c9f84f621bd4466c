"""The pipeline's MLflow run: one per pipeline run, resumed by each step."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow

from pipeline.config import PipelineConfig

logger = logging.getLogger(__name__)


def _run_file(work_dir: Path) -> Path:
    return Path(work_dir) / "run.json"


def run_id(work_dir: Path) -> str | None:
    path = _run_file(work_dir)
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


@contextmanager
def tracked_run(config: PipelineConfig) -> Iterator[mlflow.ActiveRun]:
    """Starts the pipeline's run, or resumes it if an earlier step started it."""
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_experiment(config.experiment)
    existing = run_id(config.work_dir)
    if existing is not None:
        try:
            mlflow.MlflowClient(config.tracking_uri).get_run(existing)
        except mlflow.exceptions.MlflowException:
            raise RuntimeError(
                f"{config.work_dir} belongs to MLflow run {existing}, which "
                f"{config.tracking_uri} does not have: use the tracking URI of its "
                "first step, or a new --work-dir"
            ) from None
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
