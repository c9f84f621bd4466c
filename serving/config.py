"""Settings for the serving process, read from ``EMAREC_*`` environment variables."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.recommendations import MAX_CAPACITY, log_bytes

_DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Shorter tokens are guessable; 16 characters of a random token are plenty.
MIN_ADMIN_TOKEN_CHARS = 16
# The body limit by default: room for the largest request the other limits
# allow (max_batch users of max_history items with clicks, ratings and
# features: about 19 bytes an item written compactly, 45 indented by two
# spaces, 56 with ids of 19 digits) and a margin for the rest.
BODY_BYTES_PER_ITEM = 64
BODY_BYTES_BASE = 64 * 1024


def _physical_memory() -> int | None:
    """Bytes of physical memory, where the platform says (Linux, macOS)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _default_tracking_uri() -> str:
    """Falls back to MLflow's own variable so one export configures both."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _DEFAULT_TRACKING_URI


class ServingSettings(BaseSettings):
    """How to find the model, where to listen and what to report.

    Every field can be set as ``EMAREC_<FIELD>``, e.g. ``EMAREC_PORT=9000``.

    Attributes:
        recommendation_cache: recommendations whose feedback is accepted:
            the latest ones, at most this many ...
        recommendation_cache_items: ... and holding at most this many items
            together (at least ``max_k``). Both are allocated at start-up,
            about 33 bytes a recommendation and 10 an item; at most a quarter
            of the machine's memory together.
        poll_interval_s: seconds between checks of the registry alias; a new
            version under it is loaded in the background and swapped in.
        model_cache: loaded versions kept in memory (the serving one
            included), so a rollback to one of them is instant.
        admin_token: bearer token of the ``/v1/admin`` endpoints; they are
            disabled while it is unset.
        max_body_bytes: largest request body accepted; larger ones get 413.
            By default, room for the largest request ``max_batch`` and
            ``max_history`` allow, indented by two spaces: 64 KiB plus 64
            bytes per item of ``max_batch`` x ``max_history`` (864 KiB with
            theirs).
        torch_threads: torch intra-op threads of the serving process. Each
            request is small and the threadpool already runs requests side by
            side, so one thread per request avoids oversubscribing the cores.
        torch_interop_threads: torch inter-op threads of the serving process.
        malloc_arenas: the most glibc malloc arenas (0: glibc's default of up
            to 8 per core, under which RSS creeps up as threads park freed
            memory in arenas of their own).
        malloc_mmap_threshold: blocks of at least this many bytes are mapped
            on their own and returned whole when freed (0: glibc's sliding
            threshold, under which large transient tensors fragment the heap).
        malloc_trim_interval_s: seconds between full garbage collections,
            each followed by a return of free heap pages to the kernel
            (``malloc_trim``); 0 never runs them, nor freezes the start-up
            objects out of the collector's sight.
        keep_alive_s: seconds an idle client connection stays open. Longer
            than the idle time of common clients' pools (httpx 5 s, load
            balancers often 60 s): a server that closes first races the
            client's next request on that connection, which then fails with
            a reset instead of an answer (uvicorn's own default is 5 s).
    """

    model_config = SettingsConfigDict(env_prefix="EMAREC_", extra="forbid")

    tracking_uri: str = Field(default_factory=_default_tracking_uri)
    model_name: str = "emarec"
    model_alias: str = "champion"
    model_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    report_interval_s: float = 30
    serving_experiment: str = "emarec-serving"
    max_batch: int = 256
    max_history: int = 50
    max_k: int = 100
    recommendation_cache: int = 100_000
    recommendation_cache_items: int = 1_000_000
    poll_interval_s: float = 30
    model_cache: int = 3
    admin_token: SecretStr | None = None
    max_body_bytes: int | None = None
    torch_threads: int = 1
    torch_interop_threads: int = 1
    malloc_arenas: int = Field(2, ge=0)
    malloc_mmap_threshold: int = Field(256 * 1024, ge=0, le=32 * 1024 * 1024)
    malloc_trim_interval_s: float = Field(10, ge=0)
    keep_alive_s: float = Field(75, gt=0)

    @field_validator(
        "tracking_uri", "model_name", "model_alias", "host", "serving_experiment"
    )
    @classmethod
    def _not_blank(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            env = f"EMAREC_{info.field_name.upper()}"
            raise ValueError(f"{info.field_name} is empty; set {env} or unset it")
        return value

    @field_validator("model_dir")
    @classmethod
    def _is_bundle_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(
                f"model_dir {str(value)!r} is not a directory; point EMAREC_MODEL_DIR "
                "at an exported bundle or unset it to load from the MLflow registry"
            )
        return value

    @field_validator("port")
    @classmethod
    def _valid_port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(
                f"port {value} is out of range; set EMAREC_PORT between 1 and 65535"
            )
        return value

    @field_validator("report_interval_s", "poll_interval_s")
    @classmethod
    def _positive_interval(cls, value: float, info: ValidationInfo) -> float:
        if not (math.isfinite(value) and value > 0):
            env = f"EMAREC_{info.field_name.upper()}"
            raise ValueError(
                f"{info.field_name} must be a finite number > 0, got {value}; set "
                f"{env} to a positive number of seconds"
            )
        return value

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"admin_token is shorter than {MIN_ADMIN_TOKEN_CHARS} characters; "
                "set EMAREC_ADMIN_TOKEN to a long random value, e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe())'`, or "
                "unset it to disable the admin endpoints"
            )
        return value

    @field_validator(
        "max_batch",
        "max_history",
        "max_k",
        "recommendation_cache",
        "recommendation_cache_items",
        "model_cache",
        "max_body_bytes",
        "torch_threads",
        "torch_interop_threads",
    )
    @classmethod
    def _positive_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value < 1:
            env = f"EMAREC_{info.field_name.upper()}"
            raise ValueError(
                f"{info.field_name} must be >= 1, got {value}; set {env} to a "
                "positive integer"
            )
        return value

    @model_validator(mode="after")
    def _body_fits_the_largest_request(self) -> ServingSettings:
        if self.max_body_bytes is None:
            items = self.max_batch * self.max_history
            self.max_body_bytes = BODY_BYTES_BASE + BODY_BYTES_PER_ITEM * items
        return self

    @model_validator(mode="after")
    def _log_fits_a_recommendation(self) -> ServingSettings:
        if self.recommendation_cache > MAX_CAPACITY:
            raise ValueError(
                f"recommendation_cache must be <= {MAX_CAPACITY}, got "
                f"{self.recommendation_cache}; lower EMAREC_RECOMMENDATION_CACHE"
            )
        needed = log_bytes(self.recommendation_cache, self.recommendation_cache_items)
        memory = _physical_memory()
        if memory and needed > memory // 4:
            raise ValueError(
                f"the recommendation log would take {needed / 2**30:.1f} GiB, more "
                f"than a quarter of this machine's {memory / 2**30:.1f} GiB; lower "
                "EMAREC_RECOMMENDATION_CACHE or EMAREC_RECOMMENDATION_CACHE_ITEMS"
            )
        if self.recommendation_cache_items < self.max_k:
            raise ValueError(
                f"recommendation_cache_items ({self.recommendation_cache_items}) "
                f"must hold one recommendation of max_k ({self.max_k}) items; "
                "raise EMAREC_RECOMMENDATION_CACHE_ITEMS or lower EMAREC_MAX_K"
            )
        return self
