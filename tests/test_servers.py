"""The test infrastructure itself: process helper, MLflow server, data, env."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.servers import (
    MlflowServer,
    Process,
    ServerStartError,
    free_port,
    wait_http,
)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_process_serves_then_stops(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = Process(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        log_path=tmp_path / "http.log",
        cwd=tmp_path,
        ready_url=url,
        ready_timeout_s=30,
    )
    with proc:
        assert proc.running
        assert httpx.get(url, trust_env=False).status_code == 200
    assert not proc.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, trust_env=False, timeout=2)


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a not-yet-reaped zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] == "Z"


def test_process_kills_children_and_ignored_sigterm(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and leaves a child behind, like a server
    # CLI that spawns its workers: the whole group must be gone after exit.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "sleeper = 'import time; time.sleep(600)'\n"
        "child = subprocess.Popen([sys.executable, '-c', sleeper])\n"
        "print('CHILD' + '_PID=%d' % child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = Process(
        [sys.executable, "-c", script],
        log_path=tmp_path / "stubborn.log",
        stop_timeout_s=1,
    )
    with proc:
        deadline = time.monotonic() + 10
        while "CHILD_PID=" not in proc.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        child_pid = int(proc.log_text().split("CHILD_PID=")[1].split()[0])
        assert not _gone(child_pid)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while not _gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child_pid)


def test_process_startup_failure_reports_log_tail(tmp_path: Path) -> None:
    proc = Process(
        [
            sys.executable,
            "-c",
            "print('boom: bad config', flush=True); raise SystemExit(3)",
        ],
        log_path=tmp_path / "fail.log",
        ready_url=f"http://127.0.0.1:{free_port()}/health",
        ready_timeout_s=30,
    )
    with pytest.raises(ServerStartError) as info:
        with proc:
            pass
    message = str(info.value)
    assert "exited with status 3" in message
    assert "boom: bad config" in message
    assert not proc.running


def test_wait_http_times_out() -> None:
    with pytest.raises(TimeoutError):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout_s=0.5)


@pytest.mark.slow
def test_mlflow_server_round_trip(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    assert mlflow_server.uri.startswith("http://127.0.0.1:")
    server_env = Path(f"/proc/{mlflow_server.process.pid}/environ").read_bytes()
    assert b"MLFLOW_DISABLE_TELEMETRY=true" in server_env.split(b"\0")
    health = httpx.get(f"{mlflow_server.uri}/health", trust_env=False)
    assert health.status_code == 200

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    name = f"infra-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None and experiment.experiment_id == experiment_id
    # Proxied artifacts: clients see an mlflow-artifacts: URI, never a path.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")

    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    for step, value in enumerate([0.5, 0.25, 0.125]):
        client.log_metric(run_id, "loss", value, step=step)
    client.log_param(run_id, "lr", "0.01")

    payload = tmp_path / "notes.txt"
    payload.write_text("hello from emarec\n")
    client.log_artifact(run_id, str(payload), artifact_path="docs")
    client.set_terminated(run_id)

    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.25), (2, 0.125)]
    fetched = client.get_run(run_id)
    assert fetched.data.params["lr"] == "0.01"
    assert fetched.info.status == "FINISHED"

    assert [f.path for f in client.list_artifacts(run_id, "docs")] == ["docs/notes.txt"]
    out = Path(
        client.download_artifacts(run_id, "docs/notes.txt", str(tmp_path / "dl"))
    )
    assert out.read_text() == "hello from emarec\n"
    # ...and the server stored it under its own artifacts folder.
    stored = list(mlflow_server.artifacts_dir.rglob("notes.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "hello from emarec\n"


@pytest.mark.slow
def test_mlflow_fluent_api_via_env(mlflow_uri: str, tmp_path: Path) -> None:
    import mlflow

    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_uri
    mlflow.set_experiment(f"infra-fluent-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as run:
        mlflow.log_metric("ctr", 0.1)
        mlflow.log_text("plot placeholder", "plots/readme.txt")
    got = mlflow.MlflowClient().get_run(run.info.run_id)
    assert got.data.metrics["ctr"] == pytest.approx(0.1)
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/plots/readme.txt")
    assert text == "plot placeholder"


@pytest.mark.slow
def test_mlflow_server_host_header_check(mlflow_server: MlflowServer) -> None:
    # 127.0.0.1:PORT and localhost:PORT are accepted by MLflow 3's Host check;
    # a foreign Host header is refused (the DNS-rebinding guard is on).
    api = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search"
    body = {"max_results": 1}
    for host in (f"127.0.0.1:{mlflow_server.port}", f"localhost:{mlflow_server.port}"):
        r = httpx.post(api, json=body, headers={"Host": host}, trust_env=False)
        assert r.status_code == 200, (host, r.status_code, r.text[:200])
    r = httpx.post(api, json=body, headers={"Host": "rebind.example"}, trust_env=False)
    assert r.status_code in (400, 403), r.status_code


def test_env_isolation_removes_leaky_vars() -> None:
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not [k for k in os.environ if k.startswith("EMAREC_")]


def test_env_isolation_part1_sets_uri() -> None:
    import mlflow

    os.environ["EMAREC_LEAK"] = "1"
    mlflow.set_tracking_uri("http://127.0.0.1:9")


def test_env_isolation_part2_sees_nothing() -> None:
    import mlflow

    assert "EMAREC_LEAK" not in os.environ
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not mlflow.get_tracking_uri().startswith("http://127.0.0.1:9")


def test_ml100k_dir(ml100k_dir: Path) -> None:
    first = (ml100k_dir / "u.data").read_text().splitlines()[0].split("\t")
    assert len(first) == 4 and all(part.isdigit() for part in first)


def test_tmp_airflow_home(tmp_airflow_home: Path) -> None:
    assert os.environ["AIRFLOW_HOME"] == str(tmp_airflow_home)
    assert tmp_airflow_home.is_dir() and not any(tmp_airflow_home.iterdir())
