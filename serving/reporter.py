"""Online serving metrics, flushed periodically to an MLflow run."""

from __future__ import annotations

import logging
import math
import random
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from serving.config import ServingSettings
from serving.memory import resident_zeros
from serving.plots import CtrPoint, ctr_by_cohort_png, latency_histogram_png

logger = logging.getLogger(__name__)

COHORTS = ("warm", "cold")
ENDPOINTS = ("embedding", "embeddings", "recommendations", "feedback")
PERCENTILES = (50, 95, 99)
RESERVOIR_SIZE = 10_000
# While the tracking server stays down, repeat the failed-flush warning at most
# this often; the failures in between are logged at debug level.
FAILURE_WARNING_EVERY_S = 60.0
# Flushes kept for the CTR chart: over three days at the default 30 s interval.
HISTORY_SIZE = 10_000
PLOT_DIR = "plots"
CTR_PLOT = "ctr_by_cohort.png"
LATENCY_PLOT = "latency_histogram.png"


class _Latency:
    """Request count and a uniform reservoir of latencies since start.

    Reservoir sampling (algorithm R) keeps memory fixed while every request
    since start has the same chance of being in the sample, so percentiles
    estimate the cumulative distribution.
    """

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.count = 0
        # Resident now, so the process does not grow as the reservoir fills
        # (a list of 10,000 Python floats took about 320 KB more).
        self._samples = resident_zeros(capacity, np.float64)
        self._rng = rng

    @property
    def samples_ms(self) -> np.ndarray:
        """The kept latencies, a view; copy it to keep it past the next add."""
        return self._samples[: min(self.count, len(self._samples))]

    def add(self, latency_ms: float) -> None:
        self.count += 1
        if self.count <= len(self._samples):
            self._samples[self.count - 1] = latency_ms
            return
        slot = self._rng.randrange(self.count)
        if slot < len(self._samples):
            self._samples[slot] = latency_ms


@dataclass(frozen=True)
class ServingSnapshot:
    """Cumulative serving counts at one instant.

    Attributes:
        impressions: impressions by cohort (``warm``/``cold``).
        clicks: clicks by cohort.
        requests: handled requests by endpoint.
        latency_ms: ``{percentile: milliseconds}`` by endpoint; endpoints with
            no requests yet are absent.
    """

    impressions: dict[str, int]
    clicks: dict[str, int]
    requests: dict[str, int]
    latency_ms: dict[str, dict[int, float]]


def _ctr(clicks: int, impressions: int) -> float:
    """Clicks per impression; NaN without impressions (no CTR yet, not 0)."""
    return clicks / impressions if impressions else float("nan")


def snapshot_metrics(snapshot: ServingSnapshot) -> dict[str, float]:
    """Name the snapshot's values as the MLflow metrics of a serving run.

    Args:
        snapshot: cumulative counts to convert.

    Returns:
        Metric values by key, e.g. ``serving/cold/ctr``.
    """
    metrics: dict[str, float] = {}
    for cohort in COHORTS:
        impressions, clicks = snapshot.impressions[cohort], snapshot.clicks[cohort]
        metrics[f"serving/{cohort}/impressions"] = impressions
        metrics[f"serving/{cohort}/clicks"] = clicks
        if impressions:  # a cohort no feedback has reached has no CTR yet
            metrics[f"serving/{cohort}/ctr"] = _ctr(clicks, impressions)
    impressions = sum(snapshot.impressions.values())
    clicks = sum(snapshot.clicks.values())
    metrics["serving/impressions"] = impressions
    metrics["serving/clicks"] = clicks
    if impressions:
        metrics["serving/ctr"] = _ctr(clicks, impressions)
    for endpoint in ENDPOINTS:
        metrics[f"serving/{endpoint}/requests"] = snapshot.requests[endpoint]
        for pct, value in snapshot.latency_ms.get(endpoint, {}).items():
            metrics[f"serving/{endpoint}/latency_p{pct}_ms"] = value
    return metrics


class ServingReporter:
    """Thread-safe serving counters for one model version, reported to MLflow.

    Impressions and clicks are counted per cohort; the model version is the
    run's ``model_version`` tag, so one reporter serves one model version.
    Latencies are cumulative since start: a request count plus a uniform
    reservoir of at most ``reservoir_size`` samples per endpoint, from which
    p50/p95/p99 are estimated. Because every value is cumulative, a flush that
    fails loses nothing: the next one carries the totals.

    A background thread flushes every ``interval_s`` seconds and once more at
    :meth:`stop`. The MLflow run is created lazily at the first flush that
    reaches the tracking server. Each successful flush also logs two charts
    to the run, overwriting the previous ones: ``plots/ctr_by_cohort.png``
    (cumulative CTR per cohort over the flushes so far) and
    ``plots/latency_histogram.png`` (the latency reservoirs).
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        model_name: str,
        model_version: str,
        model_run_id: str | None,
        interval_s: float,
        reservoir_size: int = RESERVOIR_SIZE,
        client: Any = None,
        seed: int = 0,
    ) -> None:
        """Set up empty counters; nothing talks to MLflow until a flush.

        Args:
            tracking_uri: MLflow tracking server or store.
            experiment: experiment that holds serving runs, created if missing.
            model_name: registered model name, a run tag.
            model_version: served model version, a run tag.
            model_run_id: training run of the served version (tag
                ``model_run_id``); ``None`` leaves the tag out.
            interval_s: seconds between background flushes.
            reservoir_size: latency samples kept per endpoint.
            client: an ``MlflowClient``-like object; built from
                ``tracking_uri`` when ``None``.
            seed: seed of the reservoir's sampling.
        """
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.model_name = model_name
        self.model_version = model_version
        self._tags = {"model_name": model_name, "model_version": model_version}
        if model_run_id is not None:
            self._tags["model_run_id"] = model_run_id
        self._interval_s = interval_s
        self._client = client or mlflow.MlflowClient(tracking_uri=tracking_uri)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._impressions = dict.fromkeys(COHORTS, 0)
        self._clicks = dict.fromkeys(COHORTS, 0)
        rng = random.Random(seed)
        self._latency = {e: _Latency(reservoir_size, rng) for e in ENDPOINTS}
        self._run_id: str | None = None
        self._step = 0
        self._failed_flushes = 0
        self._last_warning = -math.inf
        self._history: deque[CtrPoint] = deque(maxlen=HISTORY_SIZE)
        self._plots_failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(
        cls,
        settings: ServingSettings,
        model_version: str,
        model_run_id: str | None,
        client: Any = None,
    ) -> ServingReporter:
        """Build a reporter from serving settings.

        Args:
            settings: serving settings (tracking URI, experiment, interval).
            model_version: served model version.
            model_run_id: training run of that version, if known.
            client: an ``MlflowClient``-like object; built from the settings
                when ``None``.

        Returns:
            An unstarted reporter.
        """
        return cls(
            tracking_uri=settings.tracking_uri,
            experiment=settings.serving_experiment,
            model_name=settings.model_name,
            model_version=model_version,
            model_run_id=model_run_id,
            interval_s=settings.report_interval_s,
            client=client,
        )

    @property
    def run_id(self) -> str | None:
        """The serving run's id, once a flush has created it."""
        return self._run_id

    def record_latency(self, endpoint: str, seconds: float) -> None:
        """Count one handled request and its wall time.

        Args:
            endpoint: one of :data:`ENDPOINTS`.
            seconds: handler wall time.

        Raises:
            ValueError: unknown endpoint.
        """
        if endpoint not in self._latency:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected {ENDPOINTS}")
        with self._lock:
            self._latency[endpoint].add(seconds * 1000.0)

    def record_feedback(self, cohort: str, impressions: int, clicks: int) -> None:
        """Add new (not duplicate) impressions and clicks for a cohort.

        Args:
            cohort: ``warm`` or ``cold``.
            impressions: newly recorded impressions.
            clicks: newly recorded clicks.

        Raises:
            ValueError: unknown cohort or negative counts.
        """
        if cohort not in self._impressions:
            raise ValueError(f"unknown cohort {cohort!r}; expected {COHORTS}")
        if impressions < 0 or clicks < 0:
            raise ValueError("impressions and clicks must be >= 0")
        with self._lock:
            self._impressions[cohort] += impressions
            self._clicks[cohort] += clicks

    def snapshot(self) -> ServingSnapshot:
        """Copy the cumulative counts and latency percentiles.

        Returns:
            The counts as of now.
        """
        with self._lock:
            impressions = dict(self._impressions)
            clicks = dict(self._clicks)
            requests = {e: lat.count for e, lat in self._latency.items()}
            samples = {e: lat.samples_ms.copy() for e, lat in self._latency.items()}
        latency_ms = {
            endpoint: _percentiles(values)
            for endpoint, values in samples.items()
            if len(values)
        }
        return ServingSnapshot(impressions, clicks, requests, latency_ms)

    def flush(self) -> bool:
        """Log the cumulative metrics to the serving run at the next step.

        Returns:
            Whether MLflow took the metrics; on failure the counts stay and a
            warning is logged (repeated at most once a minute while the
            failures go on).
        """
        with self._flush_lock:
            snapshot = self.snapshot()
            metrics = snapshot_metrics(snapshot)
            try:
                run_id = self._ensure_run()
                timestamp = int(time.time() * 1000)
                batch = [
                    Metric(key, float(value), timestamp, self._step)
                    for key, value in metrics.items()
                ]
                self._client.log_batch(run_id, metrics=batch)
            # Any failure here (connection, HTTP, store) must not take serving
            # down; the cumulative counts make the next flush catch up.
            except Exception as exc:
                self._flush_failed(exc)
                return False
            self._flush_worked()
            logger.debug("flushed %d metrics at step %d", len(batch), self._step)
            self._history.append(_ctr_point(snapshot, self._step, timestamp))
            self._log_plots(run_id, snapshot)
            self._step += 1
            return True

    def _log_plots(self, run_id: str, snapshot: ServingSnapshot) -> None:
        """Draw both charts and log them to the run, replacing earlier ones.

        A failure is logged and swallowed: the metrics already landed, and the
        next flush draws the charts again from the full history.
        """
        started = time.perf_counter()
        title = f"{self.model_name} v{self.model_version}"
        with self._lock:
            samples = {e: lat.samples_ms.copy() for e, lat in self._latency.items()}
        try:
            charts = {
                CTR_PLOT: ctr_by_cohort_png(list(self._history), title=title),
                LATENCY_PLOT: latency_histogram_png(
                    samples, snapshot.requests, title=title
                ),
            }
            with tempfile.TemporaryDirectory(prefix="emarec-plots-") as folder:
                for name, png in charts.items():
                    path = Path(folder) / name
                    path.write_bytes(png)
                    self._client.log_artifact(run_id, str(path), PLOT_DIR)
        # Charts are a convenience; no failure of theirs may fail the flush.
        except Exception as exc:
            self._plots_failed(exc)
            return
        self._plots_failing = False
        elapsed_ms = (time.perf_counter() - started) * 1000
        logger.debug("logged serving plots in %.0f ms", elapsed_ms)

    def _plots_failed(self, exc: Exception) -> None:
        # Warn once per run of failures; the metrics still flow meanwhile.
        log = logger.debug if self._plots_failing else logger.warning
        self._plots_failing = True
        log("could not log serving plots to run %s: %s", self._run_id, exc)

    def _flush_failed(self, exc: Exception) -> None:
        self._failed_flushes += 1
        now = time.monotonic()
        quiet = now - self._last_warning < FAILURE_WARNING_EVERY_S
        if quiet and self._failed_flushes > 1:
            logger.debug("serving metrics flush failed again: %s", exc)
            return
        self._last_warning = now
        logger.warning(
            "serving metrics flush to %s failed (%d in a row), keeping counts for "
            "the next flush: %s",
            self.tracking_uri,
            self._failed_flushes,
            exc,
        )

    def _flush_worked(self) -> None:
        if self._failed_flushes:
            logger.info(
                "serving metrics reach %s again after %d failed flushes",
                self.tracking_uri,
                self._failed_flushes,
            )
        self._failed_flushes = 0
        self._last_warning = -math.inf

    def start(self) -> None:
        """Start the background flush thread.

        Raises:
            RuntimeError: already started.
        """
        if self._thread is not None:
            raise RuntimeError("reporter already started")
        self._thread = threading.Thread(
            target=self._loop, name="serving-reporter", daemon=True
        )
        self._thread.start()
        logger.info(
            "serving reporter started: every %.1f s to experiment %r at %s",
            self._interval_s,
            self.experiment,
            self.tracking_uri,
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop flushing after one final flush and end the serving run.

        Args:
            timeout_s: longest wait for the final flush; the thread is a
                daemon, so a hung tracking server cannot block exit.
        """
        self._stop.set()
        if self._thread is None:
            self._finish()
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning(
                "final serving metrics flush still running after %.1f s; giving up",
                timeout_s,
            )

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.flush()
        self._finish()

    def _finish(self) -> None:
        self.flush()
        if self._run_id is None:
            return
        try:
            self._client.set_terminated(self._run_id, status="FINISHED")
        # Ending the run is bookkeeping; failing it must not fail shutdown.
        except Exception as exc:
            logger.warning("could not end serving run %s: %s", self._run_id, exc)
        logger.info("serving reporter stopped (run %s)", self._run_id)

    def _ensure_run(self) -> str:
        if self._run_id is None:
            experiment_id = self._experiment_id()
            run = self._client.create_run(
                experiment_id,
                tags=self._tags,
                run_name=f"serve-{self.model_name}-v{self.model_version}",
            )
            self._run_id = run.info.run_id
            logger.info(
                "serving run %s in experiment %r", self._run_id, self.experiment
            )
        return self._run_id

    def _experiment_id(self) -> str:
        experiment = self._client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(self.experiment)
        except MlflowException:
            # Another replica may have created it between the lookup and here.
            experiment = self._client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id


def _ctr_point(snapshot: ServingSnapshot, step: int, timestamp_ms: int) -> CtrPoint:
    ctr = {c: _ctr(snapshot.clicks[c], snapshot.impressions[c]) for c in COHORTS}
    return CtrPoint(step, timestamp_ms / 1000.0, ctr, dict(snapshot.impressions))


def _percentiles(values: list[float]) -> dict[int, float]:
    points = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {pct: float(point) for pct, point in zip(PERCENTILES, points, strict=True)}
