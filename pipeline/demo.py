"""``emarec demo``: the pipeline, then a real server in the background, a replay
of the test period against it, and a clean stop that flushes serving's CTR and
latency report to MLflow."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from mlflow import MlflowClient

from pipeline.config import PipelineConfig
from pipeline.replay import replay_test_period
from pipeline.run import run_pipeline
from pipeline.summary import print_summary

logger = logging.getLogger(__name__)

SERVER_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(config: PipelineConfig, port: int, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "EMAREC_TRACKING_URI": config.tracking_uri,
        "EMAREC_MODEL_NAME": config.model_name,
        "EMAREC_MODEL_ALIAS": config.alias,
        "EMAREC_HOST": "127.0.0.1",
        "EMAREC_PORT": str(port),
        "EMAREC_REPORT_INTERVAL_S": "10",
    }
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "serving"], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early; its log:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url}/healthz; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM lets uvicorn run the lifespan shutdown, which flushes the report."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        logger.warning("the server did not stop within 60 s; killing it")
        process.kill()


def serving_run_summary(config: PipelineConfig) -> dict:
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name("emarec-serving")
    if experiment is None:
        return {}
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        return {}
    run = runs[0]
    return {"run_id": run.info.run_id, **run.data.metrics}


def run_demo(config: PipelineConfig, port: int | None = None) -> int:
    started = time.monotonic()
    results = run_pipeline(config)
    print_summary(config, results)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(config.work_dir) / "server.log"
    process = start_server(config, port, log_path)
    try:
        wait_ready(url, process, log_path)
        logger.info("server up at %s (log: %s); replaying the test period", url, log_path)
        replay = replay_test_period(url, config.data, config.mapping)
    finally:
        stop_server(process)
    serving = serving_run_summary(config)
    print()
    print(f"replay     {replay['users']} users, {replay['errors']} errors")
    for cohort, figures in replay["cohorts"].items():
        print(
            f"           {cohort}: {figures['impressions']} impressions, "
            f"{figures['clicks']} clicks, CTR {figures['ctr']:.4f}"
        )
    if serving:
        print(f"serving    MLflow run {serving['run_id']} in experiment 'emarec-serving':")
        for name in sorted(serving):
            if name.endswith(("/ctr", "latency_p99_ms")):
                print(f"           {name} = {serving[name]:.4f}")
    print(f"demo took {time.monotonic() - started:.0f} s; `.venv/bin/mlflow ui --backend-store-uri "
          f"{config.tracking_uri}` shows the runs")
    return 0 if replay["errors"] == 0 and serving else 1
