"""The whole batch pipeline in one process: ingest, train, quantize, evaluate,
register. Each step reads what the previous one wrote under ``work_dir``, so
the Airflow DAG can run them as separate tasks."""

from __future__ import annotations

import logging

import mlflow

from pipeline.config import PipelineConfig
from pipeline.evaluate import run_evaluate
from pipeline.ingest import run_ingest
from pipeline.quantize import run_quantize
from pipeline.register import run_register
from pipeline.tracking import flatten, tracked_run
from pipeline.train import run_train

logger = logging.getLogger(__name__)

STEPS = {
    "ingest": run_ingest,
    "train": run_train,
    "quantize": run_quantize,
    "evaluate": run_evaluate,
    "register": run_register,
}


def run_step(name: str, config: PipelineConfig) -> dict:
    """Runs one step; the first step also records the run's configuration."""
    if name == "ingest":
        config.work_dir.mkdir(parents=True, exist_ok=True)
        config.save(config.work_dir / "config.json")
    result = STEPS[name](config)
    if name == "ingest":
        with tracked_run(config):
            mlflow.log_params(
                flatten("", config.model_dump(mode="json", exclude={"train"}))
            )
            counts = flatten("", {k: v for k, v in result.items() if k != "source"})
            mlflow.log_metrics({f"ingest/{k}": float(v) for k, v in counts.items()})
    return result


def run_pipeline(config: PipelineConfig) -> dict:
    """Runs every step in order; returns each step's result by name."""
    return {name: run_step(name, config) for name in STEPS}
