"""Typed configuration of a pipeline run; unknown keys and impossible values are
refused with a message naming the key."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def default_work_dir() -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / stamp


class TrainConfig(BaseModel):
    """How the teacher, its EMA and the student train."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    embedding_dim: int = Field(32, ge=4, le=1024)
    hidden_dim: int = Field(64, ge=4, le=4096)
    max_history: int = Field(20, ge=1, le=500)
    batch_size: int = Field(512, ge=8)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    lr: float = Field(2e-3, gt=0, lt=1)
    student_lr: float = Field(4e-3, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    negatives: int = Field(4, ge=0, le=50, description="sampled unseen items per event")
    ema_decay: float = Field(0.995, gt=0, lt=1)
    ema_warmup: bool = True
    divergence_threshold: float = Field(
        1.5,
        gt=1,
        description="an EMA valid loss above this times the best so far is divergence",
    )
    snapshot_window: int = Field(
        3, ge=1, description="EMA snapshots kept on disk, with their valid loss"
    )
    distill_interval: int = Field(10, ge=1, description="teacher steps per student step")
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
    distill_label: float = Field(1.0, ge=0)
    distill_embedding: float = Field(1.0, ge=0)
    distill_attention: float = Field(1.0, ge=0)
    distill_click: float = Field(1.0, ge=0)
    quantize_dense: str = "auto"
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

    @field_validator("ema_decay")
    @classmethod
    def _decay_range(cls, value: float) -> float:
        if not 0.9 <= value < 1:
            raise ValueError(
                f"ema_decay {value} is outside [0.9, 1): an EMA teacher needs a decay "
                "close to 1, e.g. 0.995 for recommenders"
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

    @model_validator(mode="after")
    def _checkpoint_on_sync(self) -> "TrainConfig":
        every = self.checkpoint_every
        for name in ("distill_interval", "sync_interval"):
            if every % getattr(self, name):
                raise ValueError(
                    f"checkpoint_every {every} must be a multiple of {name} "
                    f"{getattr(self, name)}: a checkpoint is taken where a "
                    "snapshot was just published and no student batch is pending"
                )
        return self

    @field_validator("quantize_dense")
    @classmethod
    def _dense_choice(cls, value: str) -> str:
        if value not in ("auto", "always", "never"):
            raise ValueError(f"quantize_dense must be auto, always or never, not {value!r}")
        return value


class PipelineConfig(BaseModel):
    """Where the data comes from, where the run writes, and MLflow."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = None
    mapping: Path | None = None
    work_dir: Path = Field(default_factory=default_work_dir)
    tracking_uri: str = Field(default_factory=default_tracking_uri)
    experiment: str = "emarec"
    model_name: str = "emarec"
    alias: str = "champion"
    eval_k: int = Field(10, ge=1)
    train: TrainConfig = TrainConfig()

    @classmethod
    def from_file(cls, path: Path, **overrides) -> "PipelineConfig":
        """Reads JSON or YAML, then applies ``overrides`` (``None`` values skipped)."""
        from data.generic import read_structured

        raw = read_structured(path, "--config") or {}
        if not isinstance(raw, dict):
            raise ValueError(f"--config {path} must hold a mapping of settings")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(raw)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> "PipelineConfig":
        return cls.model_validate_json(Path(path).read_text())
