"""The weekly retrain DAG, run by Airflow itself (`airflow dags test`)."""

from __future__ import annotations

import json
import subprocess
import sys

from mlflow import MlflowClient

from pathlib import Path

from tests.servers import child_env, venv_bin

REPO_ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "emarec_weekly_retrain"
MODEL = "emarec-dag"


def airflow(args, env, timeout):
    return subprocess.run(
        [venv_bin("airflow"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dag_is_weekly_and_its_file_imports_nothing_heavy():
    code = (
        "import sys, airflow_dags.weekly_retrain as d; "
        "heavy = [m for m in ('torch', 'torchrec', 'mlflow', 'pandas') if m in sys.modules]; "
        "dag = d.weekly_retrain(); "
        "print(heavy, dag.schedule, sorted(dag.task_ids))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    heavy, rest = out.stdout.strip().splitlines()[-1].split("] ", 1)
    assert heavy == "[", f"the DAG file imported {heavy}]"
    assert rest.startswith("@weekly")
    for task in ("ingest", "train", "quantize", "evaluate", "register"):
        assert task in rest


def test_weekly_dag_retrains_and_registers(
    tmp_airflow_home, mlflow_server, ml100k_dir, tmp_path
):
    env = child_env(
        AIRFLOW_HOME=str(tmp_airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO_ROOT / "airflow_dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    migrate = airflow(["db", "migrate"], env, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    conf = {
        "data": str(ml100k_dir),
        "work_root": str(tmp_path / "runs"),
        "tracking_uri": mlflow_server.uri,
        "experiment": "e2e-dag",
        "model_name": MODEL,
        "max_steps": 20,
        "student_epochs": 0,
    }
    run = airflow(
        ["dags", "test", DAG_ID, "2026-11-30", "-c", json.dumps(conf)], env, timeout=900
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-5000:]
    for task in ("ingest", "train", "quantize", "evaluate", "register"):
        assert f"task_id={task}" in log or f"'{task}'" in log, f"task {task} did not run"
    assert "state=success" in log or "success" in log.lower()

    client = MlflowClient(mlflow_server.uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1"
    work_dirs = list((tmp_path / "runs").iterdir())
    assert len(work_dirs) == 1 and (work_dirs[0] / "register.json").is_file()
    assert json.loads((work_dirs[0] / "register.json").read_text())["promoted"] is True
