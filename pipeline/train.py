"""Train: the online teacher, its EMA (the teacher that counts), and the student.

Each teacher step is followed by an EMA update. Every ``sync_interval`` updates
the EMA shadow is published through the double buffer as a new teacher
snapshot. Every ``distill_interval`` teacher steps the student takes one
distillation step on the batches seen since its last step, against the current
snapshot. After the teacher's last epoch, the student may take
``student_epochs`` more passes against the final snapshot.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from data.examples import Examples, sample_negatives
from data.split import ONBOARDING_EVENTS
from models.distill import DistillWeights, distillation_loss, label_loss
from models.ema import EMA
from models.ema_guard import DivergenceGuard, SnapshotWindow
from models.network import Batch, NetworkConfig, RecNetwork
from models.snapshot import DoubleBuffer
from models.store import save_network
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.prepare import Prepared, prepare
from pipeline.tracking import flatten, tracked_run

logger = logging.getLogger(__name__)

LOG_EVERY = 10


def model_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "model"


@dataclass
class Curves:
    """Training curves, also logged to MLflow with steps."""

    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def add(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.points.setdefault(name, []).append((step, float(value)))
        mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)


@dataclass(frozen=True)
class StudentVariant:
    """How one student learns: its loss weights and which teacher it reads.

    ``source`` is ``"ema"`` (the published EMA snapshot, the product's way) or
    ``"online"`` (the live online teacher, for comparison).
    """

    weights: DistillWeights
    source: str = "ema"


@dataclass
class Student:
    network: RecNetwork
    optimizer: torch.optim.Optimizer
    variant: StudentVariant


MAIN_STUDENT = "student"


class Trainer:
    """Holds the networks and runs the schedule described above.

    Args:
        prepared: the encoded data.
        config: training settings.
        variants: students to train side by side on the same batches, by name;
            by default the one product student, distilled from the EMA teacher
            with the configured weights.
    """

    def __init__(
        self,
        prepared: Prepared,
        config: TrainConfig,
        variants: dict[str, StudentVariant] | None = None,
        adaptive_ema: bool = False,
        snapshot_dir: Path | None = None,
    ):
        self.prepared, self.config = prepared, config
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        dims = {"embedding_dim": config.embedding_dim, "hidden_dim": config.hidden_dim}
        space = prepared.space
        self.teacher_config = NetworkConfig.from_space(space, use_user_id=True, **dims)
        self.student_config = NetworkConfig.from_space(space, use_user_id=False, **dims)
        self.teacher = RecNetwork(self.teacher_config, space.item_tokens)
        self.ema = EMA(self.teacher, config.ema_decay, warmup=config.ema_warmup)
        self.adaptive_ema = (
            EMA(self.teacher, config.ema_decay, warmup=config.ema_warmup, adaptive=True)
            if adaptive_ema
            else None
        )
        self.buffer = DoubleBuffer(self.teacher, background=config.background_sync)
        # Shadow writes wait for the snapshot being filled from them.
        self.ema.write_barrier = self.buffer.wait
        self.buffer.publish(self.ema.synced_shadow(), 0)
        self.guard = DivergenceGuard(
            self.ema, self.buffer, threshold=config.divergence_threshold
        )
        self.window = (
            SnapshotWindow(snapshot_dir, keep=config.snapshot_window) if snapshot_dir else None
        )
        self.teacher_opt = torch.optim.Adam(
            self.teacher.parameters(), config.lr, weight_decay=config.weight_decay
        )
        weights = DistillWeights(
            config.distill_label,
            config.distill_embedding,
            config.distill_attention,
            config.distill_click,
        )
        variants = variants or {MAIN_STUDENT: StudentVariant(weights)}
        self.students = {name: self._student(v) for name, v in variants.items()}
        self.train_examples = prepared.select("warm", "train")
        self.valid = Batch.from_examples(prepared.select("warm", "valid"))
        self.seen = prepared.seen_in_train()
        self.first_items = first_items(self.train_examples, ONBOARDING_EVENTS)
        self.curves = Curves()
        self.step = 0
        self.student_steps = 0

    def _student(self, variant: StudentVariant) -> Student:
        if variant.source not in ("ema", "online"):
            raise ValueError(f"student source must be ema or online, not {variant.source!r}")
        network = RecNetwork(self.student_config, self.prepared.space.item_tokens)
        optimizer = torch.optim.Adam(network.parameters(), self.config.student_lr)
        return Student(network, optimizer, variant)

    @property
    def student(self) -> RecNetwork:
        return next(iter(self.students.values())).network

    def epoch_examples(self) -> Examples:
        negatives = sample_negatives(
            self.train_examples,
            self.prepared.space.num_items,
            self.seen,
            self.config.negatives,
            self.rng,
        )
        examples = Examples.concat([self.train_examples, negatives])
        return examples.take(self.rng.permutation(len(examples)))

    def batches(self, examples: Examples):
        size = self.config.batch_size
        for start in range(0, len(examples), size):
            yield examples.take(np.arange(start, min(start + size, len(examples))))

    def steps_per_epoch(self) -> int:
        rows = len(self.train_examples) * (1 + self.config.negatives)
        return -(-rows // self.config.batch_size)

    def planned_steps(self) -> int:
        total = self.steps_per_epoch() * self.config.epochs
        return min(total, self.config.max_steps or total)

    def teacher_step(self, batch: Batch) -> float:
        self.teacher.train()
        out = self.teacher(batch)
        loss = label_loss(out, batch.label, batch.rated)
        self.teacher_opt.zero_grad()
        loss.backward()
        self.teacher_opt.step()
        # The snapshot in flight reads the shadow: let it finish before moving it.
        self.buffer.wait()
        updated = self.ema.step(self.teacher)
        if self.adaptive_ema is not None:
            self.adaptive_ema.step(self.teacher)
        if updated and self.ema.num_updates % self.config.sync_interval == 0:
            self.buffer.publish(self.ema.synced_shadow(), self.ema.num_updates)
        return loss.item()

    def cold_style(self, examples: Examples) -> Examples:
        """Cuts some rows' history to the user's first events.

        The student serves new users, who come with a handful of onboarding
        items; training it only on long histories would leave it unused to
        that. The first events of a user precede every later event, so the
        cut history still only holds the past.
        """
        share = self.config.cold_history_share
        rows = np.flatnonzero(
            (examples.history_len > ONBOARDING_EVENTS)
            & (self.rng.random(len(examples)) < share)
        )
        if len(rows) == 0:
            return examples
        examples = examples.take(np.arange(len(examples)))  # a copy
        examples.history[rows] = 0
        examples.history[rows, :ONBOARDING_EVENTS] = self.first_items[examples.user_id[rows]]
        examples.history_len[rows] = ONBOARDING_EVENTS
        return examples

    def student_step(self, examples: Examples) -> dict[str, float]:
        """One distillation step of every student on the same batch.

        Returns the first student's loss terms, for the training curves.
        """
        batch = Batch.from_examples(self.cold_style(examples))
        targets = {}
        with torch.no_grad():
            with self.buffer.read() as snapshot:
                targets["ema"] = snapshot.module(batch)
                version = snapshot.version
            if any(s.variant.source == "online" for s in self.students.values()):
                self.teacher.eval()
                targets["online"] = self.teacher(batch)
        logged = None
        for student in self.students.values():
            student.network.train()
            out = student.network(batch)
            target = targets[student.variant.source]
            loss, terms = distillation_loss(
                out, target, batch.label, batch.rated, student.variant.weights
            )
            student.optimizer.zero_grad()
            loss.backward()
            student.optimizer.step()
            logged = logged or terms
        self.student_steps += 1
        return {
            **{f"distill/{k}": v for k, v in logged.items()},
            "distill/snapshot_version": version,
        }

    def run(self) -> dict:
        total = self.planned_steps()
        pending: list[Examples] = []
        terms: dict[str, float] = {}
        started = time.perf_counter()
        with tqdm(total=total, desc="train teacher", unit="step") as bar:
            for epoch in range(self.config.epochs):
                for examples in self.batches(self.epoch_examples()):
                    loss = self.teacher_step(Batch.from_examples(examples))
                    self.step += 1
                    pending.append(examples)
                    if self.step % self.config.distill_interval == 0:
                        terms = self.student_step(Examples.concat(pending))
                        pending = []
                    if self.step % LOG_EVERY == 0:
                        values = {
                            "train/teacher_loss": loss,
                            "train/ema_decay": self.ema.current_decay(),
                            **terms,
                        }
                        self.curves.add(self.step, values)
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch)
                    if self.step >= total:
                        break
                self.log_validation()
                if self.step >= total:
                    break
        self.buffer.wait()
        self.buffer.publish(self.ema.synced_shadow(), self.ema.num_updates)
        self.buffer.wait()
        seconds = time.perf_counter() - started
        self.finish_student()
        return {
            "teacher_steps": self.step,
            "student_steps": self.student_steps,
            "snapshot_version": self.buffer.version,
            "train_seconds": round(seconds, 2),
            "teacher_steps_per_second": round(self.step / max(seconds, 1e-9), 2),
        }

    def finish_student(self) -> None:
        """Extra distillation passes against the final EMA snapshot."""
        if not self.config.student_epochs:
            return
        steps = self.config.student_epochs * self.steps_per_epoch()
        with tqdm(total=steps, desc="distill student", unit="step") as bar:
            for _ in range(self.config.student_epochs):
                for examples in self.batches(self.epoch_examples()):
                    terms = self.student_step(examples)
                    if self.student_steps % LOG_EVERY == 0:
                        self.curves.add(self.step + self.student_steps, terms)
                    bar.update()
        self.log_validation()

    @torch.no_grad()
    def log_validation(self) -> None:
        """Valid loss and AUC of the online teacher, the EMA teacher and the student."""
        label = self.valid.label.numpy()
        values = {}
        with self.buffer.read() as snapshot:
            models = {
                "online_teacher": self.teacher,
                "ema_teacher": snapshot.module,
                **{name: s.network for name, s in self.students.items()},
            }
            for name, model in models.items():
                model.eval()
                logit = model(self.valid).logit
                values[f"valid/{name}/log_loss"] = float(
                    F.binary_cross_entropy_with_logits(logit, self.valid.label)
                )
                values[f"valid/{name}/auc"] = float(roc_auc_score(label, logit.numpy()))
        values["train/ema_active_decay"] = self.ema.active_decay
        self.curves.add(self.step + self.student_steps, values)
        ema_loss = values["valid/ema_teacher/log_loss"]
        if self.window is not None:
            self.window.save(self.ema, ema_loss, self.ema.num_updates)
        if not self.guard.check(ema_loss):
            logger.warning(
                "EMA teacher diverged at step %d: restored the last good snapshot, "
                "decay lowered to %.4f",
                self.step,
                self.ema.active_decay,
            )
        logger.info(
            "step %d: valid AUC online %.4f, EMA %.4f, student %.4f",
            self.step,
            values["valid/online_teacher/auc"],
            values["valid/ema_teacher/auc"],
            values[f"valid/{next(iter(self.students))}/auc"],
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.prepared.space.save(folder / "space.json")
        save_network(self.teacher, self.teacher_config, folder, "online_teacher")
        with self.buffer.read() as snapshot:
            save_network(snapshot.module, self.teacher_config, folder, "ema_teacher")
        extra = []
        if self.adaptive_ema is not None:
            adaptive = copy.deepcopy(self.teacher)
            self.adaptive_ema.copy_to(adaptive)
            save_network(adaptive, self.teacher_config, folder, "ema_teacher_adaptive")
            extra.append("ema_teacher_adaptive")
        (folder / "teachers.json").write_text(json.dumps(extra))
        for name, student in self.students.items():
            save_network(student.network, self.student_config, folder, name)
        (folder / "students.json").write_text(json.dumps(list(self.students)))
        torch.save(self.ema.checkpoint(self.teacher, self.teacher_opt), folder / "checkpoint.pt")
        (folder / "curves.json").write_text(json.dumps(self.curves.points))
        self.buffer.close()


def first_items(examples: Examples, count: int) -> np.ndarray:
    """``[max user id + 1, count]``: each user's first ``count`` items.

    A train example with history length ``n < count`` is the user's event
    number ``n``, so its item is first item ``n``.
    """
    table = np.zeros((int(examples.user_id.max()) + 1, count), np.int64)
    early = np.flatnonzero((examples.history_len < count) & (examples.rated == 1))
    table[examples.user_id[early], examples.history_len[early]] = examples.item_idx[early]
    return table


def run_train(
    config: PipelineConfig,
    variants: dict[str, StudentVariant] | None = None,
    adaptive_ema: bool = False,
) -> dict:
    """Trains on ``work_dir/ingest`` and writes the networks to ``work_dir/model``."""
    prepared = prepare(config.work_dir, config.train.max_history)
    with tracked_run(config):
        mlflow.log_params(flatten("train", config.train.model_dump()))
        folder = model_dir(config.work_dir)
        trainer = Trainer(
            prepared, config.train, variants, adaptive_ema, folder / "snapshots"
        )
        summary = trainer.run()
        trainer.save(folder)
        mlflow.log_metrics({f"train/{k}": float(v) for k, v in summary.items()})
    (model_dir(config.work_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
