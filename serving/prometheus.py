"""Serving counters in Prometheus' text format, labelled by model version."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class PrometheusMetrics:
    """Impressions, clicks and latency beside the MLflow report.

    The counters live in a registry of their own (one per app, so a second
    app in the same process never registers a name twice) and carry a
    ``model_version`` label, so one scrape covers every version this process
    has served.
    """

    def __init__(self) -> None:
        """Create the counters at zero."""
        self.registry = CollectorRegistry()
        self._impressions = Counter(
            "emarec_impressions",
            "Recommended items shown, by cohort and model version",
            ["cohort", "model_version"],
            registry=self.registry,
        )
        self._clicks = Counter(
            "emarec_clicks",
            "Recommended items clicked, by cohort and model version",
            ["cohort", "model_version"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "emarec_request_latency_seconds",
            "Handler wall time, by endpoint and serving model version",
            ["endpoint", "model_version"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS_S,
        )
        self._model = Info("emarec_model", "Served model", registry=self.registry)

    def serving(self, model_version: str) -> None:
        """Name the version now serving.

        Args:
            model_version: the version just swapped in.
        """
        self._model.info({"model_version": model_version})

    def feedback(
        self, model_version: str, cohort: str, impressions: int, clicks: int
    ) -> None:
        """Add new impressions and clicks of one version's recommendation.

        Args:
            model_version: the version that made the recommendation.
            cohort: ``warm`` or ``cold``.
            impressions: newly recorded impressions.
            clicks: newly recorded clicks.
        """
        self._impressions.labels(cohort, model_version).inc(impressions)
        self._clicks.labels(cohort, model_version).inc(clicks)

    def latency(self, model_version: str, endpoint: str, seconds: float) -> None:
        """Observe one handled request.

        Args:
            model_version: the version serving the request.
            endpoint: the endpoint's short name.
            seconds: handler wall time.
        """
        self._latency.labels(endpoint, model_version).observe(seconds)

    def text(self) -> tuple[bytes, str]:
        """The counters in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
