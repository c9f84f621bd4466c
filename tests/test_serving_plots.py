"""Serving charts: valid PNGs from synthetic data, logged by reporter flushes."""

from __future__ import annotations

import logging
import struct

import pytest

from serving.plots import CtrPoint, ctr_by_cohort_png, latency_histogram_png
from serving.reporter import ENDPOINTS, ServingReporter
from tests.fakes import FakeMlflowClient

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = {"plots/ctr_by_cohort.png", "plots/latency_histogram.png"}


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def synthetic_history(points: int = 20) -> list[CtrPoint]:
    history = []
    for step in range(points):
        impressions = {"warm": 100 * (step + 1), "cold": 40 * (step + 1)}
        ctr = {"warm": 0.05 + 0.001 * step, "cold": 0.03 + 0.002 * step}
        history.append(CtrPoint(step, 1_700_000_000 + 30.0 * step, ctr, impressions))
    return history


def make_reporter(client) -> ServingReporter:
    return ServingReporter(
        tracking_uri="fake://",
        experiment="serving-plots",
        model_name="emarec",
        model_version="4",
        model_run_id=None,
        interval_s=3600,
        client=client,
    )


def test_ctr_chart_is_a_png():
    width, height = png_size(ctr_by_cohort_png(synthetic_history(), title="v4"))
    assert width > 0 and height > 0


@pytest.mark.parametrize("history", [[], synthetic_history(1)])
def test_ctr_chart_handles_no_and_one_flush(history):
    assert png_size(ctr_by_cohort_png(history))[0] > 0


def test_latency_chart_is_a_png_with_idle_and_constant_endpoints():
    samples = {
        "embedding": [1.0 + 0.01 * i for i in range(5000)],
        "embeddings": [],
        "recommendations": [7.5] * 30,
        "feedback": [0.4, 0.5, 9.0],
    }
    requests = {"embedding": 20_000, "embeddings": 0}
    width, height = png_size(latency_histogram_png(samples, requests, title="v4"))
    assert width > 0 and height > 0


def test_latency_chart_without_endpoints_is_still_a_png():
    assert png_size(latency_histogram_png({}))[0] > 0


def test_flush_logs_both_charts_and_overwrites_them():
    client = FakeMlflowClient()
    reporter = make_reporter(client)
    reporter.record_feedback("warm", impressions=10, clicks=2)
    for i, endpoint in enumerate(ENDPOINTS):
        reporter.record_latency(endpoint, 0.001 * (i + 1))
    assert reporter.flush()
    first = dict(client.artifacts[reporter.run_id])
    assert set(first) == PLOTS
    reporter.record_feedback("cold", impressions=5, clicks=1)
    assert reporter.flush()
    second = client.artifacts[reporter.run_id]
    assert set(second) == PLOTS
    for data in second.values():
        assert png_size(data)[0] > 0
    # The CTR chart now has a second point, so it was drawn again.
    assert second["plots/ctr_by_cohort.png"] != first["plots/ctr_by_cohort.png"]


def test_failed_flush_draws_nothing():
    client = FakeMlflowClient(fail=True)
    reporter = make_reporter(client)
    assert not reporter.flush()
    assert client.artifacts == {}


class ArtifactlessClient(FakeMlflowClient):
    """Takes metrics but refuses every artifact."""

    def log_artifact(self, run_id, local_path, artifact_path=None) -> None:
        raise PermissionError("artifact store is read-only")


def test_chart_failure_keeps_the_flush_and_warns_once(caplog):
    client = ArtifactlessClient()
    reporter = make_reporter(client)
    reporter.record_feedback("warm", impressions=3, clicks=1)
    with caplog.at_level(logging.WARNING, logger="serving.reporter"):
        assert reporter.flush()
        assert reporter.flush()
    assert client.last_metrics()["serving/warm/impressions"] == 3
    warnings = [r for r in caplog.records if "serving plots" in r.getMessage()]
    assert len(warnings) == 1
    assert "read-only" in warnings[0].getMessage()
