"""Weekly retrain: ingest, train, quantize, evaluate, then register and promote.

Each task runs one step of the same pipeline as ``emarec run``, on a work folder
of its own per DAG run; the new version becomes ``champion`` only when it is no
worse than the current one on cold and warm Recall@10, give or take
``gate_tolerance_se`` standard errors. Heavy imports happen inside the tasks,
so parsing this file stays cheap.

Params (override with ``--conf`` or in the trigger form): ``data`` (a
MovieLens-100K folder or a log file; else ``EMAREC_DATA`` or the default
lookup), ``mapping``, ``work_root`` (default ``EMAREC_WORK_ROOT`` or
``runs``), ``tracking_uri`` (default ``MLFLOW_TRACKING_URI`` or
``sqlite:///mlflow.db``), ``experiment`` and ``model_name`` (both
``emarec``), ``epochs``, ``max_steps``, ``student_epochs``, ``nproc`` (train
sharded in that many processes, as ``emarec train --nproc``),
``gate_tolerance_se`` (default 2).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

PARAMS = {
    "data": Param(None, type=["null", "string"]),
    "mapping": Param(None, type=["null", "string"]),
    "work_root": Param(None, type=["null", "string"]),
    "tracking_uri": Param(None, type=["null", "string"]),
    "experiment": Param("emarec", type="string"),
    "model_name": Param("emarec", type="string"),
    "epochs": Param(None, type=["null", "integer"], minimum=1),
    "max_steps": Param(None, type=["null", "integer"], minimum=1),
    "student_epochs": Param(None, type=["null", "integer"], minimum=0),
    # 0: train in the task's process; N: N TorchRec-sharded processes (torchrun).
    "nproc": Param(None, type=["null", "integer"], minimum=0),
    "gate_tolerance_se": Param(None, type=["null", "number"], minimum=0),
}


def _run_step(name: str, work_dir: str | None = None, params: dict | None = None, run_id: str = "") -> dict:
    from pipeline.run import run_step
    from pipeline.schedule import config_for_run, config_of

    config = config_of(work_dir) if work_dir else config_for_run(params or {}, run_id)
    result = run_step(name, config)
    return {"work_dir": str(config.work_dir), **{k: v for k, v in result.items() if _small(v)}}


def _small(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


@dag(
    dag_id="emarec_weekly_retrain",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 4, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["emarec"],
    doc_md=__doc__,
)
def weekly_retrain():
    @task
    def ingest(params=None, run_id=None) -> dict:
        return _run_step("ingest", params=params, run_id=run_id)

    @task
    def train(previous: dict) -> dict:
        return _run_step("train", previous["work_dir"])

    @task
    def quantize(previous: dict) -> dict:
        return _run_step("quantize", previous["work_dir"])

    @task
    def evaluate(previous: dict) -> dict:
        return _run_step("evaluate", previous["work_dir"])

    @task
    def register(previous: dict) -> dict:
        return _run_step("register", previous["work_dir"])

    register(evaluate(quantize(train(ingest()))))


weekly_retrain()
