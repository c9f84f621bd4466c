"""One serving reporter per model version, so CTR lands per version in MLflow.

Each version that serves gets its own :class:`ServingReporter`, and so its own
MLflow serving run tagged with that version. Request counts and latency go to
the version that served the request; impressions and clicks go to the version
that made the recommendation, even when the feedback arrives after a swap.

A reporter lives while its version is loaded (serving or cached for a
rollback). When its version leaves memory it is retired: a final flush, then
its run is ended. Feedback that still arrives for a retired version starts a
fresh reporter (a new run with the same version tag), so nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from serving.config import ServingSettings
from serving.prometheus import PrometheusMetrics
from serving.reporter import ServingReporter, ServingSnapshot

logger = logging.getLogger(__name__)

ReporterFactory = Callable[[ServingSettings, str, str | None], ServingReporter]


class ReporterPool:
    """Started reporters by model version, and the Prometheus counters.

    Every record happens under the pool's lock, and a reporter leaves the pool
    under it too; so a reporter's final flush, which comes after, always
    includes every count recorded into it.
    """

    def __init__(
        self,
        settings: ServingSettings,
        factory: ReporterFactory,
        prometheus: PrometheusMetrics | None = None,
    ) -> None:
        """Create an empty pool.

        Args:
            settings: handed to ``factory``.
            factory: builds an unstarted reporter from settings, model version
                and training run id.
            prometheus: counters for ``/metrics``; new ones when ``None``.
        """
        self._settings = settings
        self._factory = factory
        self.prometheus = prometheus or PrometheusMetrics()
        self._reporters: dict[str, ServingReporter] = {}
        self._run_ids: dict[str, str | None] = {}
        self._retiring: list[threading.Thread] = []
        self._closed = False
        self._lock = threading.Lock()

    def serve(self, version: str, run_id: str | None, retire: Iterable[str]) -> None:
        """Get ready for a version going live and retire unloaded ones.

        Args:
            version: the version about to serve.
            run_id: its training run, a tag of its serving runs.
            retire: versions no longer loaded.
        """
        with self._lock:
            if self._closed:
                return
            self._run_ids[version] = run_id
            self._get(version)
            leaving = [self._reporters.pop(v) for v in retire if v in self._reporters]
        self.prometheus.serving(version)
        for reporter in leaving:
            self._retire(reporter)

    def get(self, version: str) -> ServingReporter:
        """The started reporter of a version, starting one if needed.

        Args:
            version: a model version.

        Returns:
            Its reporter.

        Raises:
            RuntimeError: the pool was stopped and the version has none.
        """
        with self._lock:
            return self._get(version)

    def snapshot(self, version: str) -> ServingSnapshot:
        """One version's cumulative counts.

        Args:
            version: a model version.

        Returns:
            The counts as of now.
        """
        return self.get(version).snapshot()

    def record_latency(self, version: str, endpoint: str, seconds: float) -> None:
        """Count one handled request for the version that served it.

        Args:
            version: the version serving the request.
            endpoint: one of :data:`serving.reporter.ENDPOINTS`.
            seconds: handler wall time.
        """
        with self._lock:
            if self._dropped(version, "latency"):
                return
            self._get(version).record_latency(endpoint, seconds)
        self.prometheus.latency(version, endpoint, seconds)

    def record_feedback(
        self, version: str, cohort: str, impressions: int, clicks: int
    ) -> None:
        """Add new impressions and clicks for the version that recommended.

        Args:
            version: the version that made the recommendation.
            cohort: ``warm`` or ``cold``.
            impressions: newly recorded impressions.
            clicks: newly recorded clicks.
        """
        with self._lock:
            if self._dropped(version, "feedback"):
                return
            self._get(version).record_feedback(cohort, impressions, clicks)
        self.prometheus.feedback(version, cohort, impressions, clicks)

    def stop(self) -> None:
        """Flush and end every reporter; later records are dropped."""
        with self._lock:
            self._closed = True
            reporters = list(self._reporters.values())
            self._reporters.clear()
            retiring = list(self._retiring)
        for reporter in reporters:
            reporter.stop()
        for thread in retiring:
            thread.join()

    def _get(self, version: str) -> ServingReporter:
        reporter = self._reporters.get(version)
        if reporter is None:
            if self._closed:
                raise RuntimeError("reporting has stopped; no new reporters")
            run_id = self._run_ids.get(version)
            reporter = self._factory(self._settings, version, run_id)
            reporter.start()
            self._reporters[version] = reporter
        return reporter

    def _dropped(self, version: str, what: str) -> bool:
        if self._closed:
            logger.warning(
                "%s for model version %s after reporting stopped; not counted",
                what,
                version,
            )
        return self._closed

    def _retire(self, reporter: ServingReporter) -> None:
        # The final flush waits on MLflow; a swap must not wait for it.
        thread = threading.Thread(
            target=reporter.stop,
            name=f"retire-reporter-v{reporter.model_version}",
            daemon=True,
        )
        with self._lock:
            self._retiring = [t for t in self._retiring if t.is_alive()]
            self._retiring.append(thread)
            thread.start()
        logger.info("retiring the reporter of model version %s", reporter.model_version)
