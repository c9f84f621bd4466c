"""MLflow goes down under a real ``python -m serving`` and comes back.

Serving runs on a local bundle (no registry needed) and reports to an MLflow
server of this test's own. The server is stopped mid-traffic and started
again on the same port with the same SQLite store: serving must answer every
request meanwhile, and once MLflow is back the serving run must hold exactly
the impressions, clicks and requests that were sent.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack

import httpx
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.servers import MlflowServer, Process, child_env, free_port

SERVING_EXPERIMENT = "outage-serving"

pytestmark = pytest.mark.slow


class Traffic:
    """Recommendations with feedback, and the totals the server should count."""

    def __init__(self, url: str, known_user: int) -> None:
        self.client = httpx.Client(base_url=url, timeout=30, trust_env=False)
        self.known_user = known_user
        self.sent: Counter = Counter()

    def send(self, pairs: int) -> None:
        """Send ``pairs`` recommendations, each followed by its feedback."""
        bodies = [
            {"user_id": self.known_user, "k": 4},
            {"item_ids": [1, 50], "features": {"gender": "M"}, "k": 3},
        ]
        for n in range(pairs):
            response = self.client.post("/v1/recommendations", json=bodies[n % 2])
            assert response.status_code == 200, response.text
            rec = response.json()
            clicks = [rec["items"][0]["item_id"]] if n % 3 == 0 else []
            feedback = {"recommendation_id": rec["recommendation_id"], "clicks": clicks}
            answer = self.client.post("/v1/feedback", json=feedback)
            assert answer.status_code == 200, answer.text
            cohort = rec["cohort"]
            self.sent[f"serving/{cohort}/impressions"] += len(rec["items"])
            self.sent[f"serving/{cohort}/clicks"] += len(clicks)
            self.sent["serving/impressions"] += len(rec["items"])
            self.sent["serving/clicks"] += len(clicks)
            self.sent["serving/recommendations/requests"] += 1
            self.sent["serving/feedback/requests"] += 1


def serving_metrics(uri: str) -> dict[str, float] | None:
    """The serving run's latest metrics, or ``None`` before it exists."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(SERVING_EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) <= 1, "one model version must report to one serving run"
    return runs[0].data.metrics if runs else None


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.25)


def counted(uri: str, sent: Counter) -> bool:
    metrics = serving_metrics(uri) or {}
    return all(metrics.get(key) == value for key, value in sent.items())


def test_counts_survive_an_mlflow_outage(pipeline_run, tmp_path):
    config, _ = pipeline_run
    bundle = shutil.copytree(config.work_dir / "bundle", tmp_path / "bundle")
    known_user = int(pd.read_parquet(bundle / "users.parquet").user_id.iloc[0])
    mlflow_port, port = free_port(), free_port()
    root = tmp_path / "mlflow"
    with ExitStack() as stack:
        first = stack.enter_context(MlflowServer(root, port=mlflow_port))
        env = child_env(
            EMAREC_MODEL_DIR=str(bundle),
            EMAREC_TRACKING_URI=first.uri,
            EMAREC_PORT=str(port),
            EMAREC_SERVING_EXPERIMENT=SERVING_EXPERIMENT,
            EMAREC_REPORT_INTERVAL_S="1",
        )
        url = f"http://127.0.0.1:{port}"
        serving = stack.enter_context(
            Process(
                [sys.executable, "-m", "serving"],
                log_path=tmp_path / "server.log",
                env=env,
                ready_url=f"{url}/healthz",
                ready_timeout_s=180,
                stop_timeout_s=60,
                name="emarec serve (outage)",
            )
        )
        traffic = Traffic(url, known_user)
        stack.callback(traffic.client.close)

        traffic.send(20)
        wait_for(
            "the first counts reach MLflow", lambda: counted(first.uri, traffic.sent)
        )
        before = dict(traffic.sent)

        first.stop()
        traffic.send(30)
        wait_for(
            "a flush to fail while MLflow is down",
            lambda: "keeping counts for the next flush" in serving.log_text(),
        )
        traffic.send(10)
        during = traffic.sent["serving/impressions"] - before["serving/impressions"]

        second = stack.enter_context(MlflowServer(root, port=mlflow_port))
        wait_for("the counts to catch up", lambda: counted(second.uri, traffic.sent))
        metrics = serving_metrics(second.uri)
        print(
            f"outage: {traffic.sent['serving/recommendations/requests']} "
            f"recommendations, {during} impressions sent while MLflow was down; "
            f"sent {dict(traffic.sent)}"
        )
        for key, value in traffic.sent.items():
            assert metrics[key] == value, key
        assert "serving metrics reach" in serving.log_text()

        assert serving.stop() is not None
        client = MlflowClient(second.uri)
        [run] = client.search_runs(
            [client.get_experiment_by_name(SERVING_EXPERIMENT).experiment_id]
        )
        assert run.info.status == "FINISHED"
        assert run.data.tags["model_version"] == "local"
        for key, value in traffic.sent.items():
            assert run.data.metrics[key] == value, key
