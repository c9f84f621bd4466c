"""Train: the online teacher, its EMA (the teacher that counts), and the student.

Each teacher step is followed by an EMA update. Every ``sync_interval`` updates
the EMA shadow is published through the double buffer as a new teacher
snapshot. Every ``distill_interval`` teacher steps the student takes one
distillation step on the batches seen since its last step, against the current
snapshot. After the teacher's last epoch, the student may take
``student_epochs`` more passes against the final snapshot.
"""

from __future__ import annotations

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
from models.distill import DistillWeights, distillation_loss, label_loss
from models.ema import EMA
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


class Trainer:
    """Holds the three networks and runs the schedule described above."""

    def __init__(self, prepared: Prepared, config: TrainConfig):
        self.prepared, self.config = prepared, config
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        dims = {"embedding_dim": config.embedding_dim, "hidden_dim": config.hidden_dim}
        space = prepared.space
        self.teacher_config = NetworkConfig.from_space(space, use_user_id=True, **dims)
        self.student_config = NetworkConfig.from_space(space, use_user_id=False, **dims)
        self.teacher = RecNetwork(self.teacher_config, space.item_tokens)
        self.student = RecNetwork(self.student_config, space.item_tokens)
        self.ema = EMA(self.teacher, config.ema_decay, warmup=config.ema_warmup)
        self.buffer = DoubleBuffer(self.teacher, background=config.background_sync)
        self.buffer.publish(self.ema.shadow, 0)
        self.teacher_opt = torch.optim.Adam(
            self.teacher.parameters(), config.lr, weight_decay=config.weight_decay
        )
        self.student_opt = torch.optim.Adam(self.student.parameters(), config.student_lr)
        self.weights = DistillWeights(
            config.distill_label,
            config.distill_embedding,
            config.distill_attention,
            config.distill_click,
        )
        self.train_examples = prepared.select("warm", "train")
        self.valid = Batch.from_examples(prepared.select("warm", "valid"))
        self.seen = prepared.seen_in_train()
        self.curves = Curves()
        self.step = 0
        self.student_steps = 0

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

    def planned_steps(self) -> int:
        per_epoch = -(-len(self.train_examples) * (1 + self.config.negatives) // self.config.batch_size)
        total = per_epoch * self.config.epochs
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
        self.ema.step(self.teacher)
        if self.ema.num_updates % self.config.sync_interval == 0:
            self.buffer.publish(self.ema.shadow, self.ema.num_updates)
        return loss.item()

    def student_step(self, batch: Batch) -> dict[str, float]:
        self.student.train()
        with self.buffer.read() as snapshot, torch.no_grad():
            target = snapshot.module(batch)
            version = snapshot.version
        out = self.student(batch)
        loss, terms = distillation_loss(out, target, batch.label, batch.rated, self.weights)
        self.student_opt.zero_grad()
        loss.backward()
        self.student_opt.step()
        self.student_steps += 1
        return {**{f"distill/{k}": v for k, v in terms.items()}, "distill/snapshot_version": version}

    def run(self) -> dict:
        total = self.planned_steps()
        pending: list[Examples] = []
        started = time.perf_counter()
        with tqdm(total=total, desc="train teacher", unit="step") as bar:
            for epoch in range(self.config.epochs):
                for examples in self.batches(self.epoch_examples()):
                    loss = self.teacher_step(Batch.from_examples(examples))
                    self.step += 1
                    pending.append(examples)
                    if self.step % self.config.distill_interval == 0:
                        terms = self.student_step(Batch.from_examples(Examples.concat(pending)))
                        pending = []
                    if self.step % LOG_EVERY == 0:
                        self.curves.add(
                            self.step,
                            {"train/teacher_loss": loss, "train/ema_decay": self.ema.current_decay(), **terms},
                        )
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch)
                    if self.step >= total:
                        break
                self.log_validation()
                if self.step >= total:
                    break
        self.buffer.wait()
        self.buffer.publish(self.ema.shadow, self.ema.num_updates)
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
        steps = self.config.student_epochs * -(-len(self.train_examples) * (1 + self.config.negatives) // self.config.batch_size)
        with tqdm(total=steps, desc="distill student", unit="step") as bar:
            for _ in range(self.config.student_epochs):
                for examples in self.batches(self.epoch_examples()):
                    terms = self.student_step(Batch.from_examples(examples))
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
            models = {"online_teacher": self.teacher, "ema_teacher": snapshot.module, "student": self.student}
            for name, model in models.items():
                model.eval()
                logit = model(self.valid).logit
                values[f"valid/{name}/log_loss"] = float(
                    F.binary_cross_entropy_with_logits(logit, self.valid.label)
                )
                values[f"valid/{name}/auc"] = float(roc_auc_score(label, logit.numpy()))
        self.curves.add(self.step + self.student_steps, values)
        logger.info(
            "step %d: valid AUC online %.4f, EMA %.4f, student %.4f",
            self.step,
            values["valid/online_teacher/auc"],
            values["valid/ema_teacher/auc"],
            values["valid/student/auc"],
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.prepared.space.save(folder / "space.json")
        save_network(self.teacher, self.teacher_config, folder, "online_teacher")
        with self.buffer.read() as snapshot:
            save_network(snapshot.module, self.teacher_config, folder, "ema_teacher")
        save_network(self.student, self.student_config, folder, "student")
        torch.save(self.ema.state_dict(), folder / "ema_state.pt")
        (folder / "curves.json").write_text(json.dumps(self.curves.points))
        self.buffer.close()


def run_train(config: PipelineConfig) -> dict:
    """Trains on ``work_dir/ingest`` and writes the networks to ``work_dir/model``."""
    prepared = prepare(config.work_dir, config.train.max_history)
    with tracked_run(config):
        mlflow.log_params(flatten("train", config.train.model_dump()))
        trainer = Trainer(prepared, config.train)
        summary = trainer.run()
        trainer.save(model_dir(config.work_dir))
        mlflow.log_metrics({f"train/{k}": float(v) for k, v in summary.items()})
    (model_dir(config.work_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
