"""ServingReporter: counters, percentiles, and flushes to a real MLflow server."""

from __future__ import annotations

import os

# MLflow's usage telemetry would call out of the machine; tests stay local.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import mlflow  # noqa: E402
import pytest  # noqa: E402

from serving.reporter import ENDPOINTS, ServingReporter  # noqa: E402
from tests.fakes import FakeMlflowClient  # noqa: E402
from tests.servers import free_port  # noqa: E402


def make_reporter(tracking_uri: str = "fake://", **kwargs) -> ServingReporter:
    options = {
        "tracking_uri": tracking_uri,
        "experiment": f"serving-{uuid.uuid4().hex[:8]}",
        "model_name": "emarec",
        "model_version": "3",
        "model_run_id": None,
        "interval_s": 3600,
    }
    return ServingReporter(**{**options, **kwargs})


def record_traffic(reporter: ServingReporter) -> None:
    """10 warm impressions with 2 clicks, 5 cold with 1, one request per endpoint."""
    reporter.record_feedback("warm", impressions=10, clicks=2)
    reporter.record_feedback("cold", impressions=5, clicks=1)
    for i, endpoint in enumerate(ENDPOINTS):
        reporter.record_latency(endpoint, 0.001 * (i + 1))


# Counters, without MLflow.


def test_metrics_name_cohorts_totals_and_endpoints():
    client = FakeMlflowClient()
    reporter = make_reporter(client=client)
    record_traffic(reporter)
    assert reporter.flush()
    metrics = client.last_metrics()
    assert metrics["serving/warm/ctr"] == pytest.approx(0.2)
    assert metrics["serving/cold/ctr"] == pytest.approx(0.2)
    assert metrics["serving/impressions"] == 15
    assert metrics["serving/clicks"] == 3
    assert metrics["serving/ctr"] == pytest.approx(0.2)
    assert metrics["serving/embeddings/requests"] == 1
    assert metrics["serving/feedback/latency_p50_ms"] == pytest.approx(4.0)
    assert metrics["serving/embedding/latency_p99_ms"] == pytest.approx(1.0)


def test_no_ctr_without_impressions_and_idle_endpoints_have_no_latency():
    client = FakeMlflowClient()
    reporter = make_reporter(client=client)
    assert reporter.flush()
    metrics = client.last_metrics()
    # No feedback yet: impressions 0 and no CTR, which a chart would show as 0%.
    assert metrics["serving/impressions"] == metrics["serving/cold/impressions"] == 0
    assert not any(key.endswith("ctr") for key in metrics)
    assert metrics["serving/recommendations/requests"] == 0
    assert not any("latency" in key for key in metrics)


def test_latency_reservoir_is_bounded_but_counts_every_request():
    reporter = make_reporter(client=FakeMlflowClient(), reservoir_size=200)
    for i in range(5000):
        reporter.record_latency("recommendations", (i % 100 + 1) / 1000)
    snapshot = reporter.snapshot()
    assert snapshot.requests["recommendations"] == 5000
    assert len(reporter._latency["recommendations"].samples_ms) == 200
    latency = snapshot.latency_ms["recommendations"]
    # Uniform over 1..100 ms: the sampled percentiles land near the true ones.
    assert 35 < latency[50] < 65
    assert latency[95] > 85 and latency[99] <= 100


def test_concurrent_recording_loses_nothing():
    reporter = make_reporter(client=FakeMlflowClient())

    def work():
        for _ in range(1000):
            reporter.record_feedback("cold", impressions=2, clicks=1)
            reporter.record_latency("feedback", 0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = reporter.snapshot()
    assert snapshot.impressions["cold"] == 16000
    assert snapshot.clicks["cold"] == 8000
    assert snapshot.requests["feedback"] == 8000


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.record_latency("search", 0.1),
        lambda r: r.record_feedback("lukewarm", 1, 0),
        lambda r: r.record_feedback("warm", -1, 0),
    ],
)
def test_unknown_endpoint_or_cohort_or_negative_count_is_rejected(call):
    with pytest.raises(ValueError):
        call(make_reporter(client=FakeMlflowClient()))


def test_failed_flush_keeps_counts_and_warns(caplog):
    client = FakeMlflowClient(fail=True)
    reporter = make_reporter(client=client)
    record_traffic(reporter)
    with caplog.at_level(logging.WARNING, logger="serving.reporter"):
        assert not reporter.flush()
    assert "keeping counts" in caplog.text
    client.fail = False
    assert reporter.flush()
    assert client.last_metrics()["serving/impressions"] == 15
    assert client.batches[-1][1][0].step == 0


def test_a_long_outage_warns_once_and_logs_the_recovery(caplog):
    client = FakeMlflowClient(fail=True)
    reporter = make_reporter(client=client)
    with caplog.at_level(logging.DEBUG, logger="serving.reporter"):
        for _ in range(3):
            assert not reporter.flush()
        client.fail = False
        assert reporter.flush()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "again after 3 failed flushes" in caplog.text


def test_stop_without_start_still_flushes_and_ends_run():
    client = FakeMlflowClient()
    reporter = make_reporter(client=client)
    record_traffic(reporter)
    reporter.stop()
    assert client.last_metrics()["serving/warm/clicks"] == 2
    assert client.terminated == {reporter.run_id: "FINISHED"}


def test_start_twice_is_an_error():
    reporter = make_reporter(client=FakeMlflowClient())
    reporter.start()
    try:
        with pytest.raises(RuntimeError):
            reporter.start()
    finally:
        reporter.stop()


# Against a real MLflow server.


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list:
    metrics = client.get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in metrics)


def serving_run(client: mlflow.MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment} was not created"
    [run] = client.search_runs([found.experiment_id])
    return run


@pytest.mark.slow
def test_flushes_land_in_one_run_with_model_tags_and_steps(mlflow_uri):
    client = mlflow.MlflowClient(mlflow_uri)
    training = client.create_run(client.create_experiment(f"train-{uuid.uuid4()}"))
    reporter = make_reporter(mlflow_uri, model_run_id=training.info.run_id)
    record_traffic(reporter)
    assert reporter.flush()
    reporter.record_feedback("warm", impressions=10, clicks=8)
    assert reporter.flush()
    reporter.stop()

    run = serving_run(client, reporter.experiment)
    assert run.info.run_id == reporter.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_name"] == "emarec"
    assert run.data.tags["model_version"] == "3"
    linked = client.get_run(run.data.tags["model_run_id"])
    assert linked.info.run_id == training.info.run_id
    assert history(client, run.info.run_id, "serving/warm/impressions") == [
        (0, 10),
        (1, 20),
        (2, 20),
    ]
    ctr = history(client, run.info.run_id, "serving/ctr")
    assert ctr[-1] == (2, pytest.approx(11 / 25))
    for endpoint in ENDPOINTS:
        assert run.data.metrics[f"serving/{endpoint}/requests"] == 1
        for pct in (50, 95, 99):
            assert run.data.metrics[f"serving/{endpoint}/latency_p{pct}_ms"] > 0


@pytest.mark.slow
def test_background_thread_flushes_periodically_then_finally(mlflow_uri):
    reporter = make_reporter(mlflow_uri, interval_s=0.2)
    reporter.start()
    reporter.record_feedback("cold", impressions=4, clicks=1)
    client = mlflow.MlflowClient(mlflow_uri)
    deadline = time.monotonic() + 20
    while (
        reporter.run_id is None
        or not history(client, reporter.run_id, "serving/cold/impressions")[1:]
    ):
        assert time.monotonic() < deadline, "no two periodic flushes within 20 s"
        time.sleep(0.1)
    reporter.record_feedback("cold", impressions=6, clicks=0)
    reporter.stop()
    run = client.get_run(reporter.run_id)
    assert run.info.status == "FINISHED"
    steps = history(client, reporter.run_id, "serving/cold/impressions")
    assert [step for step, _ in steps] == list(range(len(steps)))
    assert steps[-1][1] == 10
    assert run.data.metrics["serving/cold/ctr"] == pytest.approx(0.1)


class MovableClient:
    """An ``MlflowClient`` whose server can be swapped, like a server coming back."""

    def __init__(self, uri: str) -> None:
        self.client = mlflow.MlflowClient(uri)

    def __getattr__(self, name: str):
        return getattr(self.client, name)


@pytest.mark.slow
def test_unreachable_server_keeps_counts_for_later_live_flush(
    mlflow_server, monkeypatch, caplog
):
    # Fail fast instead of MLflow's minutes of retries against a closed port.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead_uri = f"http://127.0.0.1:{free_port()}"
    moving = MovableClient(dead_uri)
    reporter = make_reporter(dead_uri, client=moving)
    record_traffic(reporter)
    with caplog.at_level(logging.WARNING, logger="serving.reporter"):
        assert not reporter.flush()
    assert "failed" in caplog.text and dead_uri in caplog.text
    assert reporter.run_id is None
    reporter.record_feedback("cold", impressions=5, clicks=4)

    moving.client = mlflow.MlflowClient(mlflow_server.uri)
    assert reporter.flush()
    reporter.stop()
    client = mlflow.MlflowClient(mlflow_server.uri)
    run = serving_run(client, reporter.experiment)
    run_id = run.info.run_id
    assert history(client, run_id, "serving/cold/impressions") == [(0, 10), (1, 10)]
    assert history(client, run_id, "serving/cold/clicks") == [(0, 5), (1, 5)]
    assert run.data.metrics["serving/impressions"] == 20
    assert "model_run_id" not in run.data.tags


@pytest.mark.slow
def test_flushes_log_both_charts_to_the_serving_run(mlflow_uri, tmp_path):
    reporter = make_reporter(mlflow_uri)
    record_traffic(reporter)
    assert reporter.flush()
    reporter.record_feedback("cold", impressions=5, clicks=2)
    reporter.stop()
    client = mlflow.MlflowClient(mlflow_uri)
    listed = {a.path for a in client.list_artifacts(reporter.run_id, "plots")}
    assert listed == {"plots/ctr_by_cohort.png", "plots/latency_histogram.png"}
    local = client.download_artifacts(reporter.run_id, "plots", str(tmp_path))
    for name in ("ctr_by_cohort.png", "latency_histogram.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), f"{local}/{name} is no PNG"
