"""Typed configuration of a pipeline run; unknown keys and impossible values are
refused with a message naming the key."""

from __future__ import annotations

import json
import os
import types
import typing
from datetime import datetime, timezone
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from data.structured import Origin, explain, read_structured

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_uri(uri: str) -> str:
    """A tracking URI whose local store (``sqlite:///relative.db`` or a
    plain folder) is made absolute (resolved: no ``..``, no links); a server's URI (or ``databricks``) is
    left as it is."""
    sqlite = "sqlite:///"
    if uri.startswith(sqlite) and not uri.startswith(sqlite + "/"):
        path = uri[len(sqlite) :]
        if path in ("", ":memory:"):
            return uri
        return sqlite + str(Path(path).resolve())
    if _plain_path(uri):
        return str(Path(uri).resolve())
    return uri


def _plain_path(uri: str) -> bool:
    """A tracking URI that is a folder path: no scheme, not ``databricks``."""
    return (
        "://" not in uri
        and ":" not in uri.split("/")[0]
        and not uri.startswith("databricks")
    )


def local_store(uri: str) -> Path | None:
    """The file or folder of a local tracking store (``sqlite:///``,
    ``file:`` or a plain path), or None for a server or another kind."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    return Path(uri) if _plain_path(uri) else None


def default_work_dir() -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / stamp


class ConfigError(ValueError):
    """A setting is impossible; the message names where it came from and the fix."""


def _takes_number(annotation) -> bool:
    """Whether a field of this type holds a number and not a yes or no."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        return bool not in options and any(o in (int, float) for o in options)
    return annotation in (int, float)


class _Settings(BaseModel):
    """Unknown keys are refused; so is a yes or no where a number goes, which
    pydantic would otherwise read as 1 or 0 (YAML's ``true`` for a share,
    say)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _number_not_yes_no(cls, value, info: ValidationInfo):
        field = cls.model_fields[info.field_name]
        if isinstance(value, bool) and _takes_number(field.annotation):
            if field.default is None or field.default_factory:
                example = ", or leave the key out for the default"
            else:
                example = f", e.g. the default {field.default!r}"
            raise ValueError(
                f"{str(value).lower()} is a yes or no, not a number: write a "
                f"number{example}"
            )
        return value


class TrainConfig(_Settings):
    """How the teacher, its EMA and the student train.

    Bounds are declared on each field with a description; a value outside them
    is refused by :meth:`PipelineConfig.validated` with both in the message.
    """

    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="seed of the initial weights and the sampling",
    )
    embedding_dim: int = Field(
        32, ge=4, le=1024, description="width of every embedding"
    )
    hidden_dim: int = Field(64, ge=4, le=4096, description="width of the hidden layers")
    max_history: int = Field(
        20,
        ge=5,
        le=500,
        description="past items a user's history keeps; at least the 5 "
        "onboarding events a new user comes with",
    )
    batch_size: int = Field(512, ge=8, description="events per training batch")
    epochs: int = Field(3, ge=1, description="teacher epochs")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    lr: float = Field(2e-3, gt=0, lt=1, description="the teacher's Adam learning rate")
    student_lr: float = Field(
        4e-3, gt=0, lt=1, description="the student's Adam learning rate"
    )
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    negatives: int = Field(9, ge=0, le=50, description="sampled unseen items per event")
    ema_decay: float = Field(
        0.995,
        ge=0.9,
        lt=1,
        description="the EMA teacher's decay: at 1 the average never moves from "
        "the initial weights, and below 0.9 it is hardly an average; typical "
        "values are 0.99 to 0.9999",
    )
    ema_warmup: bool = True
    divergence_threshold: float = Field(
        1.5,
        gt=1,
        description="an EMA valid loss above this times the best so far is divergence",
    )
    snapshot_window: int = Field(
        3, ge=1, description="EMA snapshots kept on disk, with their valid loss"
    )
    distill_interval: int = Field(
        10, ge=1, description="teacher steps per student step"
    )
    sync_interval: int = Field(10, ge=1, description="EMA updates per snapshot")
    background_sync: bool = True
    student_epochs: int = Field(
        2, ge=0, description="extra distillation epochs from the final snapshot"
    )
    cold_history_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of student rows whose history is cut to the user's "
        "first events, as a new user's onboarding would be",
    )
    history_feedback: bool = Field(
        True,
        description="the networks read the user's answer to each history item: "
        "its rating (see history_ratings) or whether they clicked it",
    )
    popularity_offset: bool = Field(
        False,
        description="both networks' interaction logit starts from the log of "
        "the item's train interactions; they learn the user's departure from it",
    )
    negative_popularity: float = Field(
        1.0,
        ge=0,
        le=2,
        description="sampled negatives are drawn in proportion to (the item's "
        "train interactions + 1) to this power, and ranking adds back the log "
        "of each item's draw probability over a uniform draw; 0: uniform "
        "negatives. Popular items a user passed over teach the ranking more "
        "than obscure ones",
    )
    history_ratings: bool = Field(
        True,
        description="with history_feedback, the networks read the 1-5 rating "
        "of each history item where the data has one, not only the click",
    )
    clicks_only_feedback_share: float = Field(
        0.2,
        ge=0,
        le=1,
        description="share of student rows whose history ratings are reduced "
        "to clicks, as a new user's request may say what they clicked but not "
        "how they rated it",
    )
    unknown_feedback_share: float = Field(
        0.2,
        ge=0,
        le=1,
        description="share of student rows whose history feedback is hidden, as "
        "a new user's request may not say what they clicked",
    )
    student_ema_decay: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="decay of an EMA of each student's weights over its final "
        "epochs (student_epochs), started from them and at most 1 - 3 / their "
        "steps; the average is what is saved, quantized and served; 0 keeps "
        "the student's last weights",
    )
    distill_cut_rows: bool = Field(
        True,
        description="the student matches the teacher's click and interaction "
        "probabilities on rows whose history is cut to the user's first events "
        "too (the teacher reads them whole); off: those rows learn from the "
        "labels alone; no effect while distill_click and distill_interact are "
        "both 0, as by default",
    )
    distill_label: float = Field(1.0, ge=0, description="weight of the label loss")
    distill_embedding: float = Field(
        0.0,
        ge=0,
        description="weight of the user-embedding distillation loss; off by "
        "default: over 3 seeds the cold student ranked better without it",
    )
    distill_attention: float = Field(
        1.0, ge=0, description="weight of the attention distillation loss"
    )
    distill_click: float = Field(
        0.0,
        ge=0,
        description="weight of the click distillation loss; off by default: "
        "in a 3-seed report on MovieLens-100K the averaged student's cold AUC "
        "was 0.733 without it and 0.719 with it, its cold Recall@10 the same",
    )
    distill_interact: float = Field(
        0.0,
        ge=0,
        description="weight of the interaction distillation loss (the "
        "teacher's probability that the user picks each row's item); off by "
        "default: in two 3-seed comparisons on MovieLens-100K the averaged "
        "student's cold Recall@10 was higher without it (0.360 against 0.345, "
        "then 0.359 against 0.353), its cold AUC the same",
    )
    distill_ranking: float = Field(
        0.0,
        ge=0,
        description="weight of the ranking distillation loss (the teacher's "
        "softmax over sampled catalogue items); off by default: over 3 seeds "
        "on MovieLens-100K it lifted the student's warm Recall@10 but lowered "
        "its cold Recall@10",
    )
    ranking_rows: int = Field(
        256, ge=1, description="rows per student step the ranking loss reads"
    )
    ranking_candidates: int = Field(
        128, ge=2, le=100_000, description="catalogue items the ranking loss samples"
    )
    quantize_dense: str = "auto"
    data_shards: int = Field(
        8,
        ge=1,
        le=4096,
        description="user partitions of the training data, each with its own "
        "share of every batch; --nproc must divide it, and the result does not "
        "depend on --nproc",
    )
    # After data_shards: its validator reads it.
    nproc: int = Field(
        0,
        ge=0,
        le=1024,
        description="0: train in this process; N: N TorchRec-sharded processes "
        "(torchrun), table optimizer fused row-wise Adagrad",
    )
    sharding: str = "table_wise"
    table_lr: float = Field(
        0.05, gt=0, lt=10, description="fused row-wise Adagrad rate of sharded tables"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="teacher steps between checkpoints (0: only at the end)"
    )

    @field_validator("unknown_feedback_share")
    @classmethod
    def _feedback_shares(cls, value: float, info: ValidationInfo) -> float:
        clicks = info.data.get("clicks_only_feedback_share")
        if clicks is not None and value + clicks > 1:
            raise ValueError(
                f"unknown_feedback_share {value} and clicks_only_feedback_share "
                f"{clicks} are shares of the same rows and add up to more than 1; "
                "lower one of them"
            )
        return value

    @field_validator("student_ema_decay")
    @classmethod
    def _student_ema_decay(cls, value: float) -> float:
        if 0 < value < 0.9:
            raise ValueError(
                f"student_ema_decay {value} is hardly an average: use 0 (off) or "
                "a decay from 0.9 to below 1, such as 0.999"
            )
        return value

    @field_validator("sharding")
    @classmethod
    def _sharding_choice(cls, value: str) -> str:
        if value not in ("table_wise", "column_wise", "row_wise"):
            raise ValueError(
                f"sharding must be table_wise, column_wise or row_wise (CUDA only), "
                f"not {value!r}"
            )
        return value

    @field_validator("nproc")
    @classmethod
    def _nproc_divides_shards(cls, value: int, info: ValidationInfo) -> int:
        shards = info.data.get("data_shards")
        if value > 1 and shards is not None and shards % value:
            fits = [n for n in range(1, shards + 1) if shards % n == 0]
            raise ValueError(
                f"nproc {value} must divide data_shards {shards}: each process "
                f"reads whole data shards. Use one of {fits}, or set "
                "train.data_shards to a multiple of it"
            )
        return value

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_on_sync(cls, value: int, info: ValidationInfo) -> int:
        for name in ("distill_interval", "sync_interval"):
            interval = info.data.get(name)
            if interval and value % interval:
                raise ValueError(
                    f"checkpoint_every {value} must be a multiple of {name} "
                    f"{interval}: a checkpoint is taken where a snapshot was just "
                    "published and no student batch is pending"
                )
        return value

    @field_validator("quantize_dense")
    @classmethod
    def _dense_choice(cls, value: str) -> str:
        # models.quantize.DENSE_CHOICES, without importing torch here.
        choices = ("auto", "static", "dynamic", "always", "never")
        if value not in choices:
            raise ValueError(
                f"quantize_dense must be one of {', '.join(choices)}, not {value!r}"
            )
        return value


class PipelineConfig(_Settings):
    """Where the data comes from, where the run writes, and MLflow."""

    data: Path | None = None
    mapping: Path | None = None
    work_dir: Path = Field(default_factory=default_work_dir)
    tracking_uri: str = Field(default_factory=default_tracking_uri)
    experiment: str = "emarec"
    model_name: str = "emarec"
    alias: str = "champion"
    eval_k: int = Field(10, ge=1, description="K of Recall@K and NDCG@K")
    gate_tolerance_se: float = Field(
        2.0,
        ge=0,
        allow_inf_nan=False,
        description="the registry gate promotes a new version unless its cold "
        "or warm Recall@K is below the champion's by more than this many "
        "standard errors of its own mean over the test users: a drop within "
        "them is not told apart from the draw of users and training noise; "
        "0: promote only when no worse at all",
    )
    train: TrainConfig = TrainConfig()

    @classmethod
    def validated(cls, raw: dict, origin: Origin | str) -> "PipelineConfig":
        """Validates raw settings.

        Args:
            raw: the settings, nested like the model.
            origin: where they came from (see :func:`data.structured.explain`).

        Raises:
            ConfigError: a key is unknown or a value impossible; one line per
                problem, naming its origin, the field, the allowed values and
                the default.
        """
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise ConfigError(explain(error, cls, origin)) from None

    @classmethod
    def from_file(cls, path: Path, **overrides) -> "PipelineConfig":
        """Reads JSON or YAML, then applies ``overrides`` (``None`` values skipped).

        Raises:
            ConfigError: the settings are not valid; the message names the file.
        """
        raw = read_structured(path, "--config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path} must hold a mapping of settings")
        given = {k: v for k, v in overrides.items() if v is not None}
        raw.update(given)
        return cls.validated(
            raw, lambda name: "overrides" if name.split(".")[0] in given else str(path)
        )

    def anchored(self) -> "PipelineConfig":
        """The same settings with the data, the mapping, the work dir and a
        local tracking store as resolved absolute paths: a step run later from
        another directory, which reads them from the saved ``config.json``,
        finds the same files, and the same files compare equal however they
        were spelled."""
        update = {
            name: getattr(self, name).resolve()
            for name in ("data", "mapping", "work_dir")
            if getattr(self, name) is not None
        }
        update["tracking_uri"] = absolute_uri(self.tracking_uri)
        return self.model_copy(update=update)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> "PipelineConfig":
        """Reads settings :meth:`save` wrote (a run's ``config.json``).

        Raises:
            ConfigError: the file is not JSON or the settings are not valid
                (edited by hand, say); the message names the file and field.
        """
        path = Path(path)
        fix = "restore it, or ingest into a new --work-dir"
        try:
            raw = json.loads(path.read_text())
        except ValueError as error:
            raise ConfigError(f"{path} is not valid JSON ({error}): {fix}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of settings: {fix}")
        return cls.validated(raw, str(path))
