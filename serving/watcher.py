"""Follow the registry alias: load a new champion in the background, swap it in.

Requests read :attr:`ModelWatcher.current` once and use that reference to the
end, so a swap (one reference assignment under a lock) never changes the model
under a request in flight. The last few loaded versions stay in memory, so
moving the alias back (a rollback) swaps without loading anything. A version
that fails to load never replaces the one serving: the error is logged and kept
for ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from models.bundle import Predictor
from serving.loading import ModelSource
from serving.registry import ModelRef

logger = logging.getLogger(__name__)

# A version that failed to load is retried by the next poll, then after 2, 4,
# 8, ... poll intervals, up to this cap; an admin reload retries it at once.
MAX_RETRY_DELAY_S = 600.0


@dataclass(frozen=True)
class ServedModel:
    """A loaded model version.

    Attributes:
        predictor: the model.
        version: its registry version (``local`` for a local bundle).
        run_id: the training run that produced it, if known.
    """

    predictor: Predictor
    version: str
    run_id: str | None = None


@dataclass(frozen=True)
class ReloadError:
    """Why the latest check did not serve the champion.

    Attributes:
        model_version: the version that failed to load; ``None`` when the
            registry itself could not be asked.
        message: the error, for people.
        at: when it happened (UTC).
    """

    model_version: str | None
    message: str
    at: datetime


@dataclass(frozen=True)
class ReloadOutcome:
    """What one check did.

    Attributes:
        model_version: the version serving after the check.
        previous_version: the version serving before it.
        error: why the champion is not serving, if it is not.
    """

    model_version: str
    previous_version: str
    error: ReloadError | None

    @property
    def changed(self) -> bool:
        """Whether the check swapped in another version."""
        return self.model_version != self.previous_version


# Called before a version goes live, with the versions dropped from the cache.
SwapHook = Callable[[ServedModel, Sequence[str]], None]


@dataclass
class _Failure:
    count: int
    retry_at: float


class ModelWatcher:
    """Serves one model version at a time and follows a source's champion.

    A background thread (:meth:`start`) checks the source every
    ``poll_interval_s`` seconds; :meth:`check` does the same on demand.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        cache_size: int,
        poll_interval_s: float,
        on_swap: SwapHook | None = None,
    ) -> None:
        """Set up; nothing is loaded until :meth:`start_serving`.

        Args:
            source: where versions come from.
            cache_size: loaded versions kept, the serving one included.
            poll_interval_s: seconds between background checks.
            on_swap: called before a version goes live (also the first one).

        Raises:
            ValueError: ``cache_size`` below 1.
        """
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._source = source
        self._cache_size = cache_size
        self._poll_interval_s = poll_interval_s
        self._on_swap = on_swap
        self._cache: OrderedDict[str, ServedModel] = OrderedDict()
        self._current: ServedModel | None = None
        self._last_error: ReloadError | None = None
        self._failures: dict[str, _Failure] = {}
        # _lock guards the reference swap; _check_lock makes checks one at a
        # time, so a poll and an admin reload never load the same version twice.
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedModel:
        """The model serving now; take it once per request.

        Raises:
            RuntimeError: nothing was loaded yet.
        """
        current = self._current
        if current is None:
            raise RuntimeError("no model is serving yet; call start_serving() first")
        return current

    @property
    def last_error(self) -> ReloadError | None:
        """Why the latest check failed; ``None`` once a check succeeds."""
        return self._last_error

    @property
    def cached_versions(self) -> tuple[str, ...]:
        """Loaded versions, least recently served first."""
        with self._lock:
            return tuple(self._cache)

    def start_serving(self) -> ServedModel:
        """Load the source's champion and serve it.

        Returns:
            The model now serving.

        Raises:
            Exception: whatever the source raised; there is nothing to serve.
        """
        with self._check_lock:
            ref = self._source.champion()
            served = self._load(ref)
            self._swap(served)
            logger.info("serving model version %s", served.version)
            return served

    def check(self, *, force: bool = True) -> ReloadOutcome:
        """Serve the source's champion if it is not serving yet.

        Never raises: a failure keeps the current model serving and is kept
        in :attr:`last_error`.

        Args:
            force: retry a version that failed before without waiting for its
                retry delay (polls pass ``False``).

        Returns:
            The versions before and after, and the error if any.
        """
        with self._check_lock:
            previous = self.current.version
            try:
                ref = self._source.champion()
            # Whatever the registry raises (down, timeout, HTTP error), the
            # current model goes on serving.
            except Exception as exc:
                return self._failed(previous, None, exc)
            if ref.version == previous:
                self._last_error = None
                return ReloadOutcome(previous, previous, None)
            if not force and self._waiting(ref.version):
                return ReloadOutcome(previous, previous, self._last_error)
            return self._serve(ref, previous)

    def start(self) -> None:
        """Start the background polling thread.

        Raises:
            RuntimeError: already started.
        """
        if self._thread is not None:
            raise RuntimeError("model watcher already started")
        self._thread = threading.Thread(
            target=self._loop, name="model-watcher", daemon=True
        )
        self._thread.start()
        logger.info("following the registry alias every %.1f s", self._poll_interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop polling; a load in progress is abandoned, not swapped in.

        Args:
            timeout_s: longest wait for the thread; it is a daemon, so a hung
                download cannot block exit.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_interval_s):
            self.check(force=False)

    def _serve(self, ref: ModelRef, previous: str) -> ReloadOutcome:
        try:
            served = self._cached(ref.version) or self._load(ref)
            if self._stop.is_set():
                return ReloadOutcome(previous, previous, None)
            self._swap(served)
        # A corrupt or missing artifact, a failed download or a failing hook:
        # none of them may stop the current model from serving.
        except Exception as exc:
            return self._failed(previous, ref.version, exc)
        self._failures.pop(ref.version, None)
        self._last_error = None
        logger.info("swapped model version %s -> %s", previous, served.version)
        return ReloadOutcome(served.version, previous, None)

    def _cached(self, version: str) -> ServedModel | None:
        with self._lock:
            return self._cache.get(version)

    def _load(self, ref: ModelRef) -> ServedModel:
        start = time.perf_counter()
        predictor = self._source.load(ref)
        logger.info(
            "loaded model version %s in %.1f s",
            ref.version,
            time.perf_counter() - start,
        )
        return ServedModel(predictor, ref.version, ref.run_id)

    def _swap(self, served: ServedModel) -> None:
        with self._lock:
            cache = OrderedDict(self._cache)
        cache[served.version] = served
        cache.move_to_end(served.version)
        evicted = []
        while len(cache) > self._cache_size:
            version, _ = cache.popitem(last=False)
            evicted.append(version)
        if self._on_swap is not None:
            self._on_swap(served, evicted)
        with self._lock:
            self._cache = cache
            self._current = served
        if evicted:
            logger.info("dropped model versions %s from memory", evicted)

    def _waiting(self, version: str) -> bool:
        failure = self._failures.get(version)
        return failure is not None and time.monotonic() < failure.retry_at

    def _failed(
        self, previous: str, version: str | None, exc: Exception
    ) -> ReloadOutcome:
        what = "reading the registry alias"
        if version is not None:
            what = f"loading model version {version}"
        message = f"{what} failed: {type(exc).__name__}: {exc}"
        logger.warning("%s; still serving version %s", message, previous)
        logger.debug("reload failure", exc_info=exc)
        if version is not None:
            self._note_failure(version)
        self._last_error = ReloadError(version, message, datetime.now(UTC))
        return ReloadOutcome(previous, previous, self._last_error)

    def _note_failure(self, version: str) -> None:
        failure = self._failures.get(version)
        count = 1 if failure is None else failure.count + 1
        # Half an interval short of the doubling, so the poll due at that
        # moment retries instead of just missing it.
        polls = 2 ** (count - 1) - 0.5
        delay = min(self._poll_interval_s * polls, MAX_RETRY_DELAY_S)
        self._failures[version] = _Failure(count, time.monotonic() + delay)
