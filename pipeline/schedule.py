"""Pipeline configs for scheduled runs (the Airflow DAG's tasks)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.config import PipelineConfig

TRAIN_PARAMS = ("epochs", "max_steps", "student_epochs", "nproc")


def config_for_run(params: dict, run_id: str) -> PipelineConfig:
    """A fresh run's config from DAG params, then ``EMAREC_*`` and defaults.

    Raises:
        ConfigError: a param is impossible, with the allowed values.
    """
    root = Path(params.get("work_root") or os.environ.get("EMAREC_WORK_ROOT") or "runs")
    safe_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id or "manual")
    raw = {
        "data": params.get("data"),
        "mapping": params.get("mapping"),
        "work_dir": root.resolve() / f"airflow-{safe_id}",
        "tracking_uri": params.get("tracking_uri"),
        "experiment": params.get("experiment"),
        "model_name": params.get("model_name"),
        "gate_tolerance_se": params.get("gate_tolerance_se"),
        "train": {k: params[k] for k in TRAIN_PARAMS if params.get(k) is not None},
    }
    given = {k: v for k, v in raw.items() if v is not None}
    return PipelineConfig.validated(given, "the DAG run's params").anchored()


def config_of(work_dir: str | Path) -> PipelineConfig:
    """The config an earlier task of the same run saved."""
    return PipelineConfig.load(Path(work_dir) / "config.json")
