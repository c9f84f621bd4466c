"""A real ``python -m serving`` following the registry alias under load.

Two versions are registered from the session pipeline's bundle the way the
pipeline does it; the server follows ``champion`` while a few threads send
recommendations and feedback. The alias moves v1 -> v2 -> v1, then to a v3
whose ``ema_teacher.pt`` is truncated. No request may fail, each response
names the version that produced it, and the counts land per version in MLflow.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from pipeline.register import PYFUNC_MODEL_FILE
from serving.config import ServingSettings
from serving.loading import LocalSource
from serving.registry import ModelRef
from serving.watcher import ModelWatcher
from tests.servers import Process, child_env, free_port

MODEL = "emarec-lifecycle"
ALIAS = "champion"
SERVING_EXPERIMENT = "lifecycle-serving"
TOKEN = "lifecycle-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
LOAD_THREADS = 3
MAX_REQUESTS_PER_THREAD = 4000

pytestmark = pytest.mark.slow


@contextmanager
def fluent_tracking(uri: str):
    """Point MLflow's fluent API at ``uri``, then forget it again."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def register(uri: str, bundle: Path) -> str:
    """Log and register ``bundle`` as the pipeline does; returns the version."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lifecycle-train")
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment("lifecycle-train")
    )
    with fluent_tracking(uri), mlflow.start_run(experiment_id=experiment_id) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_MODEL_FILE),
            artifacts={"bundle": str(bundle)},
            pip_requirements=["emarec"],
        )
        version = mlflow.register_model(info.model_uri, MODEL)
        client.set_model_version_tag(
            MODEL, version.version, "training_run_id", run.info.run_id
        )
    return str(version.version)


def corrupt_copy(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` whose EMA teacher tensors are cut in half."""
    shutil.copytree(bundle, dst)
    weights = dst / "ema_teacher.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return dst


@dataclass
class Server:
    url: str
    uri: str
    bundle: Path
    versions: list[str]
    process: Process
    known_user: int


@pytest.fixture(scope="module")
def server(pipeline_run, mlflow_server, tmp_path_factory):
    config, _ = pipeline_run
    bundle = config.work_dir / "bundle"
    uri = mlflow_server.uri
    versions = [register(uri, bundle), register(uri, bundle)]
    MlflowClient(uri).set_registered_model_alias(MODEL, ALIAS, versions[0])
    port = free_port()
    env = child_env(
        EMAREC_TRACKING_URI=uri,
        EMAREC_MODEL_NAME=MODEL,
        EMAREC_PORT=str(port),
        EMAREC_SERVING_EXPERIMENT=SERVING_EXPERIMENT,
        EMAREC_REPORT_INTERVAL_S="2",
        EMAREC_POLL_INTERVAL_S="1",
        EMAREC_ADMIN_TOKEN=TOKEN,
    )
    url = f"http://127.0.0.1:{port}"
    process = Process(
        [sys.executable, "-m", "serving"],
        log_path=tmp_path_factory.mktemp("lifecycle") / "server.log",
        env=env,
        ready_url=f"{url}/healthz",
        ready_timeout_s=180,
        stop_timeout_s=60,
        name="emarec serve (lifecycle)",
    )
    users = pd.read_parquet(bundle / "users.parquet")
    with process:
        yield Server(url, uri, bundle, versions, process, int(users.user_id.iloc[0]))


@dataclass
class Record:
    start: float
    end: float
    status: int
    version: str | None
    header: str | None


@dataclass
class Load:
    """Threads sending recommendations and feedback until told to stop."""

    url: str
    known_user: int
    stop: threading.Event = field(default_factory=threading.Event)
    records: list[Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    impressions: Counter = field(default_factory=Counter)
    clicks: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, index: int) -> None:
        bodies = [
            {"user_id": self.known_user, "k": 5},
            {"item_ids": [1, 50, 181], "features": {"gender": "F"}, "k": 5},
        ]
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as client:
            for n in range(MAX_REQUESTS_PER_THREAD):
                if self.stop.is_set():
                    return
                self._one(client, bodies[(n + index) % 2], click=n % 3 == 0)

    def _one(self, client: httpx.Client, body: dict, click: bool) -> None:
        start = time.monotonic()
        try:
            response = client.post("/v1/recommendations", json=body)
        except httpx.HTTPError as exc:
            self._error(f"recommendations: {type(exc).__name__}: {exc}")
            return
        end = time.monotonic()
        if response.status_code != 200:
            self._error(f"recommendations: {response.status_code} {response.text}")
            return
        rec = response.json()
        record = Record(
            start,
            end,
            response.status_code,
            rec["model_version"],
            response.headers.get("X-Model-Version"),
        )
        items = [item["item_id"] for item in rec["items"]]
        feedback = {
            "recommendation_id": rec["recommendation_id"],
            "clicks": items[:1] if click else [],
        }
        try:
            answer = client.post("/v1/feedback", json=feedback)
        except httpx.HTTPError as exc:
            self._error(f"feedback: {type(exc).__name__}: {exc}")
            return
        if answer.status_code != 200:
            self._error(f"feedback: {answer.status_code} {answer.text}")
            return
        with self.lock:
            self.records.append(record)
            self.impressions[rec["model_version"]] += len(items)
            self.clicks[rec["model_version"]] += len(feedback["clicks"])

    def _error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def versions_between(self, after: float, before: float) -> Counter:
        """Versions of the responses to requests sent and answered in a window."""
        with self.lock:
            return Counter(
                r.version for r in self.records if r.start > after and r.end < before
            )


@contextmanager
def running(load: Load):
    threads = [
        threading.Thread(target=load.run, args=(i,), name=f"load-{i}")
        for i in range(LOAD_THREADS)
    ]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(30)


def move_alias(server: Server, version: str) -> None:
    MlflowClient(server.uri).set_registered_model_alias(MODEL, ALIAS, version)


def reload(server: Server) -> dict:
    response = httpx.post(
        f"{server.url}/v1/admin/reload", headers=ADMIN, timeout=60, trust_env=False
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_admin_reload_needs_the_token(server):
    url = f"{server.url}/v1/admin/reload"
    for headers in ({}, {"Authorization": "Bearer not-the-lifecycle-token"}):
        response = httpx.post(url, headers=headers, trust_env=False)
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_oversized_bodies_get_413_over_http(server):
    url = f"{server.url}/v1/embeddings"
    headers = {"content-type": "application/json"}
    limit = ServingSettings(tracking_uri="fake://tracking").max_body_bytes
    padding = b" " * limit
    declared = httpx.post(
        url, content=b'{"users": [' + padding + b"]}", headers=headers, trust_env=False
    )
    chunked = httpx.post(
        url,
        content=iter([b'{"users": [', padding, b"]}"]),
        headers=headers,
        trust_env=False,
    )
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert f"limit of {limit} bytes" in response.json()["detail"]
    assert chunked.request.headers["transfer-encoding"] == "chunked"


def test_swap_rollback_and_corrupt_version_under_load(server, tmp_path):
    v1, v2 = server.versions
    load = Load(server.url, server.known_user)
    with running(load):
        time.sleep(1.5)
        moved = time.monotonic()
        move_alias(server, v2)
        assert reload(server)["model_version"] == v2
        swapped = time.monotonic()
        time.sleep(1.5)
        back = time.monotonic()
        move_alias(server, v1)
        assert reload(server)["model_version"] == v1
        rolled_back = time.monotonic()
        time.sleep(1.5)
        v3 = register(server.uri, corrupt_copy(server.bundle, tmp_path / "broken"))
        move_alias(server, v3)
        outcome = reload(server)
        time.sleep(1.0)
        finished = time.monotonic()

    sent = len(load.records)
    print(f"lifecycle: {sent} recommendations+feedback, {len(load.errors)} failed")
    assert load.errors == [], load.errors[:5]
    assert all(r.version == r.header for r in load.records)
    assert set(load.versions_between(0, moved)) == {v1}
    assert set(load.versions_between(swapped, back)) == {v2}
    assert set(load.versions_between(rolled_back, finished)) == {v1}

    # The corrupt version never served; v1 went on and the error is reported.
    assert outcome["model_version"] == v1 and outcome["changed"] is False
    assert outcome["error"]["model_version"] == v3
    health = httpx.get(f"{server.url}/healthz", trust_env=False).json()
    assert health["model_version"] == v1
    assert health["last_reload_error"]["model_version"] == v3
    log = server.process.log_text()
    # The rollback came from memory: v1 was loaded once.
    assert log.count(f"loaded model version {v1} in") == 1
    assert f"loading model version {v3} failed" in log

    move_alias(server, v1)
    assert reload(server)["error"] is None
    assert_counts_per_version(server, load)


def assert_counts_per_version(server: Server, load: Load) -> None:
    """After a clean stop, each version's serving runs hold exactly its counts."""
    server.process.stop()
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(SERVING_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    totals: dict[str, Counter] = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        version = run.data.tags["model_version"]
        total = totals.setdefault(version, Counter())
        total["impressions"] += run.data.metrics["serving/impressions"]
        total["clicks"] += run.data.metrics["serving/clicks"]
    print(f"lifecycle: MLflow totals {totals}, sent {load.impressions}, {load.clicks}")
    for version in load.impressions:
        assert totals[version]["impressions"] == load.impressions[version]
        assert totals[version]["clicks"] == load.clicks[version]


# Safe loading, in-process on the same real bundle.


class _MakeDir:
    """Pickles as a call to ``os.makedirs``: code that unpickling would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


class _Folders:
    """A source whose versions are bundle folders; ``champion`` is movable."""

    follows = True

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders
        self.champion_version = "1"

    def champion(self) -> ModelRef:
        return ModelRef(self.champion_version)

    def load(self, ref: ModelRef):
        return LocalSource(self.folders[ref.version]).load(ref)


def test_pickled_code_in_a_bundle_is_refused_and_never_runs(pipeline_run, tmp_path):
    config, _ = pipeline_run
    good = config.work_dir / "bundle"
    evil = shutil.copytree(good, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    torch.save({"weight": _MakeDir(marker)}, evil / "ema_teacher.pt")
    folders = _Folders({"1": good, "2": evil})
    watcher = ModelWatcher(folders, cache_size=2, poll_interval_s=3600)
    watcher.start_serving()
    folders.champion_version = "2"

    outcome = watcher.check()

    assert outcome.model_version == "1" and watcher.current.version == "1"
    assert "not plain weights: pickled objects" in outcome.error.message
    assert not marker.exists()
    # The payload is real: a plain unpickling would have run it.
    torch.load(evil / "ema_teacher.pt", weights_only=False)
    assert marker.is_dir()


def test_loading_a_bundle_never_calls_pickle(pipeline_run, monkeypatch):
    config, _ = pipeline_run

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle load used pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    bundle = LocalSource(config.work_dir / "bundle").load(ModelRef("local"))
    assert bundle.has_user(
        int(pd.read_parquet(bundle.path / "users.parquet").user_id[0])
    )
