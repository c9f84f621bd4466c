"""Entry points the ``emarec`` command line wires up: serve and replay."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import uvicorn

from serving import memory
from serving.app import NoModelToServe, create_app
from serving.config import ServingSettings
from serving.replay import ReplaySummary, ReplayUser
from serving.replay import replay as replay_users

logger = logging.getLogger(__name__)

UserLoader = Callable[[Path], Iterable[ReplayUser]]

# MLflow's defaults (7 retries with exponential backoff, 120 s timeouts) would
# stall a metrics flush or a registry poll for minutes while the tracking
# server is down. Serving keeps its counts and retries on its own schedule, so
# it fails fast instead. Download progress bars would only clutter the server
# log. Values already in the environment win.
MLFLOW_SERVING_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def mlflow_serving_defaults() -> None:
    """Shorten MLflow's HTTP retries and timeouts for this process."""
    for name, value in MLFLOW_SERVING_DEFAULTS.items():
        os.environ.setdefault(name, value)


def torch_threads(settings: ServingSettings) -> None:
    """Size torch's thread pools for serving, before any model runs.

    torch defaults to one intra-op thread per core in every request thread,
    so concurrent requests oversubscribe the cores: on 2 cores, embedding
    lookups at 200 req/s queued for seconds with the default, and kept a p99
    of tens of milliseconds with ``OMP_NUM_THREADS=1``.

    Args:
        settings: ``torch_threads`` and ``torch_interop_threads``.
    """
    import torch

    torch.set_num_threads(settings.torch_threads)
    try:
        torch.set_num_interop_threads(settings.torch_interop_threads)
    # torch allows this once per process, before any inter-op work.
    except RuntimeError as exc:
        logger.warning(
            "torch inter-op threads stay at %d, not %d: %s",
            torch.get_num_interop_threads(),
            settings.torch_interop_threads,
            exc,
        )
    logger.info(
        "torch threads: %d intra-op, %d inter-op",
        torch.get_num_threads(),
        torch.get_num_interop_threads(),
    )


def _no_start_up_traceback(record: logging.LogRecord) -> bool:
    """Drops the traceback uvicorn logs when start-up finds no model to serve:
    the app has logged the reason in a line, and uvicorn then says that
    start-up failed."""
    return not (
        record.getMessage().startswith("Traceback")
        and NoModelToServe.__name__ in record.getMessage()
    )


def serve(settings: ServingSettings | None = None) -> None:
    """Serve the model with uvicorn until interrupted.

    Args:
        settings: serving settings; read from ``EMAREC_*`` when ``None``.
    """
    settings = settings or ServingSettings()
    mlflow_serving_defaults()
    torch_threads(settings)
    memory.limit_arenas(settings.malloc_arenas)
    memory.fix_mmap_threshold(settings.malloc_mmap_threshold)
    logger.info("serving on http://%s:%d", settings.host, settings.port)
    logging.getLogger("uvicorn.error").addFilter(_no_start_up_traceback)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=settings.keep_alive_s,
    )


def replay(
    url: str,
    data_dir: Path,
    limit: int | None = None,
    k: int = 10,
    seed: int = 0,
    *,
    load_users: UserLoader,
) -> ReplaySummary:
    """Replay a seeded sample of held-out users against a running server.

    Args:
        url: base URL of the server.
        data_dir: data split directory handed to ``load_users``.
        limit: replay at most this many users; all when ``None``.
        k: recommendations per user.
        seed: seed of the shuffle that picks the users.
        load_users: reads the users to replay from ``data_dir``.

    Returns:
        Impressions, clicks and CTR per cohort, and the error count.

    Raises:
        ValueError: ``limit`` is below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    users = list(load_users(Path(data_dir)))
    # Shuffle so a limited replay samples both cohorts, not the file's head.
    random.Random(seed).shuffle(users)
    users = users[:limit]
    logger.info("replaying %d users from %s against %s", len(users), data_dir, url)
    return replay_users(url, users, k=k)
