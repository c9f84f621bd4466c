"""Train: the online teacher, its EMA (the teacher that counts), and the student.

Each teacher step is followed by an EMA update. Every ``sync_interval`` updates
the EMA shadow is published through the double buffer as a new teacher
snapshot. Every ``distill_interval`` teacher steps the student takes one
distillation step on the batches seen since its last step, against the current
snapshot. After the teacher's last epoch, the student may take
``student_epochs`` more passes against the final snapshot; what it keeps is
the EMA of its weights over those passes (``student_ema_decay``).

The same trainer runs in one process or as one rank of a TorchRec-sharded run
under ``torchrun`` (``python -m pipeline.train --config FILE``): a placement
(``models.sharding``) builds the networks and optimizers, and the batches are
assembled from fixed user shards, so the result does not depend on the number
of processes. Checkpoints (``torch.distributed.checkpoint``) let a killed run
resume where its last one left off.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from data.examples import (
    FEEDBACK_UNKNOWN,
    Examples,
    clicks_only,
    sample_negatives,
)
from data.split import ONBOARDING_EVENTS
from models.distill import DistillWeights, Ranked, distillation_loss, label_loss
from models.ema import EMA, named_state
from models.ema_guard import DivergenceGuard, SnapshotWindow
from models.network import Batch, NetworkConfig, RecNetwork
from models.sharding import LocalPlacement
from models.snapshot import DoubleBuffer
from models.store import save_network
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.ingest import ingest_dir
from pipeline.lineage import LINEAGE, read_lineage, stamp, write_lineage
from pipeline.prepare import (
    Prepared,
    data_shard,
    owned_shards,
    prepare,
    ranks_without_training_rows,
)
from pipeline.tracking import flatten, tracked_run

logger = logging.getLogger(__name__)

LOG_EVERY = 10


def model_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "model"


@dataclass
class Curves:
    """Training curves, also logged to MLflow with steps."""

    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    log: bool = True  # to MLflow; only one rank of a sharded run logs

    def add(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.points.setdefault(name, []).append((step, float(value)))
        if self.log:
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
    # The EMA of the student's own weights over its final epochs
    # (``student_ema_decay``), written into ``network`` when they end; None
    # before they start, and where there is none.
    average: EMA | None = None


MAIN_STUDENT = "student"


class Trainer:
    """Holds the networks and runs the schedule described above.

    Args:
        prepared: the encoded data.
        config: training settings.
        variants: students to train side by side on the same batches, by name;
            by default the one product student, distilled from the EMA teacher
            with the configured weights.
        placement: where the networks live (``models.sharding``); this process
            by default. Under a sharded placement ``prepared`` holds this
            rank's users only, and every rank builds the same Trainer.
    """

    def __init__(
        self,
        prepared: Prepared,
        config: TrainConfig,
        variants: dict[str, StudentVariant] | None = None,
        adaptive_ema: bool = False,
        snapshot_dir: Path | None = None,
        placement=None,
    ):
        self.prepared, self.config = prepared, config
        self.placement = placement or LocalPlacement()
        torch.manual_seed(config.seed)
        dims = network_dims(config)
        space = prepared.space
        train = prepared.select("warm", "train")
        if len(train) == 0:
            raise ValueError(self._no_rows(config))
        counts = np.bincount(train.item_idx[train.rated == 1], minlength=space.num_items)
        # Every rank's interactions: the draw must not depend on the sharding.
        counts = np.sum(self.placement.gather_objects(counts), axis=0)
        self.item_log_count = torch.from_numpy(np.log1p(counts).astype(np.float32))
        self.negative_probabilities, negative_log_ratio = negative_draw(
            counts, config.negative_popularity
        )
        self.negative_log_ratio = torch.from_numpy(negative_log_ratio)
        self.teacher_config = NetworkConfig.from_space(space, use_user_id=True, **dims)
        self.student_config = NetworkConfig.from_space(space, use_user_id=False, **dims)
        self.teacher = self._network(self.teacher_config)
        self.train_examples = train
        shards = data_shard(self.train_examples.user_id, config.data_shards)
        owned = owned_shards(
            self.placement.rank, self.placement.world_size, config.data_shards
        )
        self.parts = {
            s: self.train_examples.take(np.flatnonzero(shards == s)) for s in owned
        }
        if self.placement.sharded:
            # TorchRec's sharded tables add a buffer at their first forward:
            # make it before the EMA pairs the teacher's tensors by name. Past
            # DDP (``.module``), whose static graph is the first training step's.
            with torch.no_grad():
                first = np.arange(min(2, len(self.train_examples)))
                batch = Batch.from_examples(self.train_examples.take(first))
                self.teacher.module(batch)
        self.ema = EMA(
            self.teacher,
            config.ema_decay,
            warmup=config.ema_warmup,
            lazy_tables=self.placement.lazy_tables(self.teacher),
        )
        if adaptive_ema and self.placement.sharded:
            raise ValueError("the adaptive EMA comparison runs unsharded only")
        self.adaptive_ema = (
            EMA(self.teacher, config.ema_decay, warmup=config.ema_warmup, adaptive=True)
            if adaptive_ema
            else None
        )
        factory = None
        if self.placement.sharded:
            factory = lambda: self._network(self.teacher_config, trainable=False)  # noqa: E731
        self.buffer = DoubleBuffer(
            self.teacher, background=config.background_sync, factory=factory
        )
        # Shadow writes wait for the snapshot being filled from them.
        self.ema.write_barrier = self.buffer.wait
        self.buffer.publish(self.ema.synced_shadow(), 0)
        self.guard = DivergenceGuard(
            self.ema, self.buffer, threshold=config.divergence_threshold
        )
        if snapshot_dir is not None and self.placement.world_size > 1:
            snapshot_dir = Path(snapshot_dir) / f"rank-{self.placement.rank}"
        self.window = (
            SnapshotWindow(snapshot_dir, keep=config.snapshot_window)
            if snapshot_dir
            else None
        )
        self.teacher_opt = self.placement.optimizer(
            self.teacher, config.lr, weight_decay=config.weight_decay
        )
        variants = variants or {MAIN_STUDENT: StudentVariant(distill_weights(config))}
        self.students = {name: self._student(v) for name, v in variants.items()}
        self.valid = Batch.from_examples(prepared.select("warm", "valid"))
        self.seen = prepared.seen_in_train()
        self.first_items, self.first_feedback = first_items(
            self.train_examples, ONBOARDING_EVENTS
        )
        self.curves = Curves(log=self.placement.is_writer)
        self.step = 0
        self.student_steps = 0

    def _no_rows(self, config: TrainConfig) -> str:
        """Why this rank has nothing to train on, and the fix (ingest has
        refused a log without warm training rows at all)."""
        rank, world = self.placement.rank, self.placement.world_size
        shards = owned_shards(rank, world, config.data_shards)
        return (
            f"rank {rank} of {world} reads data shards {shards} (user_id % "
            f"{config.data_shards}), which hold no warm user with a training "
            "event: the log is too small to split over this many processes. "
            "Train with fewer processes (--nproc), or in one (--nproc 0)"
        )

    def _network(self, config: NetworkConfig, trainable: bool = True) -> nn.Module:
        network = RecNetwork(config, self.prepared.space.item_tokens)
        if config.popularity_offset:
            network.item_log_count.copy_(self.item_log_count)
        if config.negative_popularity:
            network.negative_log_ratio.copy_(self.negative_log_ratio)
        return self.placement.wrap(network, trainable)

    def _student(self, variant: StudentVariant) -> Student:
        if variant.source not in ("ema", "online"):
            raise ValueError(
                f"student source must be ema or online, not {variant.source!r}"
            )
        network = self._network(self.student_config)
        optimizer = self.placement.optimizer(network, self.config.student_lr)
        return Student(network, optimizer, variant)

    def _rng(self, *stream: int) -> np.random.Generator:
        """A generator of its own per use, epoch or step, and data shard: what
        a shard draws does not depend on the rank reading it, and a resumed run
        draws what the uninterrupted run would have."""
        return np.random.default_rng([self.config.seed, *stream])

    def part_rows(self) -> int:
        """Rows each data shard puts in every global batch."""
        return max(1, self.config.batch_size // self.config.data_shards)

    def steps_per_epoch(self) -> int:
        """Steps for the largest data shard to go round once, on every rank."""
        rows = max(len(part) for part in self.parts.values()) * (
            1 + self.config.negatives
        )
        return -(-self.placement.max_int(rows) // self.part_rows())

    def epoch_batches(self, epoch: int) -> Iterator[Examples]:
        """This rank's part of each global batch of an epoch.

        Each data shard shuffles its rows with fresh negatives and puts
        ``part_rows()`` of them in every batch; shards smaller than the largest
        go round their rows again, so all take the same number of steps. A
        shard without training rows (a small log can leave one with no warm
        user) puts none.
        """
        size, steps = self.part_rows(), self.steps_per_epoch()
        shuffled = []
        for shard, part in self.parts.items():
            if len(part) == 0:
                continue
            rng = self._rng(0, epoch, shard)
            negatives = sample_negatives(
                part,
                self.prepared.space.num_items,
                self.seen,
                self.config.negatives,
                rng,
                self.negative_probabilities,
            )
            rows = Examples.concat([part, negatives])
            order = np.resize(rng.permutation(len(rows)), steps * size)
            shuffled.append(rows.take(order))
        for step in range(steps):
            window = np.arange(step * size, (step + 1) * size)
            yield Examples.concat([rows.take(window) for rows in shuffled])

    def planned_steps(self) -> int:
        total = self.steps_per_epoch() * self.config.epochs
        return min(total, self.config.max_steps or total)

    def teacher_step(self, batch: Batch) -> float:
        self.teacher.train()
        with self.placement.touched_rows(self.teacher) as touched:
            out = self.teacher(batch)
        # Fused table optimizers step inside backward: catch the rows up first.
        self.ema.prepare(touched)
        loss = label_loss(out, batch.label, batch.rated, self.placement.mean_count)
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
        """Cuts some rows' history to the user's first events, hides the
        feedback of some rows' history, and reduces that of some others to
        clicks.

        The student serves new users, who come with a handful of onboarding
        items; training it only on long histories would leave it unused to
        that. The first events of a user precede every later event, so the
        cut history still only holds the past. A new user's request may not
        say how they rated their onboarding items, or even which they
        clicked: the student learns to read such histories too.
        """
        cut_draws = np.empty(len(examples))
        hide_draws = np.empty(len(examples))
        for shard, mine in self._shard_rows(examples):
            cut_draws[mine] = self._rng(1, self.student_steps, shard).random(len(mine))
            hide_draws[mine] = self._rng(4, self.student_steps, shard).random(len(mine))
        cut = np.flatnonzero(
            (examples.history_len > ONBOARDING_EVENTS)
            & (cut_draws < self.config.cold_history_share)
        )
        unknown = self.config.unknown_feedback_share
        hide = np.flatnonzero(hide_draws < unknown)
        clicks_end = unknown + self.config.clicks_only_feedback_share
        clicks = np.flatnonzero((hide_draws >= unknown) & (hide_draws < clicks_end))
        if len(cut) == 0 and len(hide) == 0 and len(clicks) == 0:
            return examples
        examples = examples.take(np.arange(len(examples)))  # a copy
        users = examples.user_id[cut]
        examples.history[cut] = 0
        examples.history[cut, :ONBOARDING_EVENTS] = self.first_items[users]
        examples.history_feedback[cut] = FEEDBACK_UNKNOWN
        examples.history_feedback[cut, :ONBOARDING_EVENTS] = self.first_feedback[users]
        examples.history_len[cut] = ONBOARDING_EVENTS
        examples.history_feedback[hide] = FEEDBACK_UNKNOWN
        feedback = examples.history_feedback
        feedback[clicks] = clicks_only(feedback[clicks])
        return examples

    def _shard_rows(self, examples: Examples) -> Iterator[tuple[int, np.ndarray]]:
        """Each data shard in ``examples`` with the positions of its rows.

        A shard's rows come in the same order on whichever rank reads them, so
        what a shard draws for them does not depend on the number of ranks.
        """
        shards = data_shard(examples.user_id, self.config.data_shards)
        for shard in np.unique(shards):
            yield int(shard), np.flatnonzero(shards == shard)

    def ranking_rows(self, examples: Examples) -> np.ndarray:
        """Positions of the rows the ranking term reads: each data shard draws
        its share of ``ranking_rows`` (at least one, so that every rank of a
        sharded run takes part)."""
        per_shard = max(1, -(-self.config.ranking_rows // self.config.data_shards))
        picked = []
        for shard, mine in self._shard_rows(examples):
            rng = self._rng(2, self.student_steps, shard)
            picked.append(rng.choice(mine, min(per_shard, len(mine)), replace=False))
        return np.sort(np.concatenate(picked))

    def ranking_batches(self, examples: Examples, styled: Examples):
        """The student's and the teacher's view of the ranking term's rows
        (:meth:`ranking_rows`), each against the same ``N =
        ranking_candidates`` items drawn from the catalogue without
        replacement: ``item_idx`` ``[S, N]``. ``None`` when no student uses it.
        """
        if not any(s.variant.weights.ranking > 0 for s in self.students.values()):
            return None
        rows = self.ranking_rows(examples)
        items = self.prepared.space.num_items - 1  # item 0 is the padding
        count = min(self.config.ranking_candidates, items)
        chosen = self._rng(3, self.student_steps).choice(items, count, replace=False)
        candidates = torch.from_numpy(chosen + 1).expand(len(rows), -1)
        views = []
        for source in (styled, examples):
            batch = Batch.from_examples(source.take(rows))
            batch.item_idx = candidates
            views.append(batch)
        return views

    def student_step(self, examples: Examples) -> dict[str, float]:
        """One distillation step of every student on the same batch.

        Returns the first student's loss terms, for the training curves.
        """
        styled = self.cold_style(examples)
        batch = Batch.from_examples(styled)
        # The teachers read each row as they were trained on it, with its whole
        # history: their targets carry what the cut history hides. Attention
        # weights over another history are no target: cut rows drop that term.
        view = Batch.from_examples(examples)
        cut = torch.from_numpy(styled.history_len != examples.history_len)  # [B]
        ranking = self.ranking_batches(examples, styled)
        # The teachers whose students weigh the ranking term score its candidates.
        ranks = {
            s.variant.source
            for s in self.students.values()
            if s.variant.weights.ranking > 0
        }
        targets, ranked_targets = {}, {}
        with torch.no_grad():
            with self.buffer.read() as snapshot:
                targets["ema"] = snapshot.module(view)
                if "ema" in ranks:
                    ranked_targets["ema"] = snapshot.module(ranking[1])
                version = snapshot.version
            if any(s.variant.source == "online" for s in self.students.values()):
                self.teacher.eval()
                targets["online"] = self.teacher(view)
                if "online" in ranks:
                    ranked_targets["online"] = self.teacher(ranking[1])
            for target in targets.values():
                target.attention = target.attention.masked_fill(cut[:, None], 0.0)
        # Cut rows may learn from the labels alone (``distill_cut_rows``).
        targeted = None if self.config.distill_cut_rows else (~cut).float()
        logged = None
        for student in self.students.values():
            student.network.train()
            out = student.network(batch)
            source = student.variant.source
            ranked = None
            if ranking is not None and student.variant.weights.ranking > 0:
                ranked = Ranked(student.network(ranking[0]), ranked_targets[source])
            loss, terms = distillation_loss(
                out,
                targets[source],
                batch.label,
                batch.rated,
                student.variant.weights,
                self.placement.mean_count,
                ranked,
                targeted,
            )
            student.optimizer.zero_grad()
            loss.backward()
            student.optimizer.step()
            if student.average is not None:
                student.average.update(student.network)
            logged = logged or terms
        self.student_steps += 1
        return {
            **{f"distill/{k}": v for k, v in logged.items()},
            "distill/snapshot_version": version,
        }

    def run(self, checkpoints: Path | None = None) -> dict:
        """Trains from step ``self.step`` (0, or where a checkpoint left off).

        Args:
            checkpoints: where to write a checkpoint every
                ``config.checkpoint_every`` teacher steps; none without it.
        """
        total = self.planned_steps()
        per_epoch = self.steps_per_epoch()
        pending: list[Examples] = []
        terms: dict[str, float] = {}
        started, start_step = time.perf_counter(), self.step
        every = self.config.checkpoint_every
        bar = tqdm(
            total=total,
            initial=self.step,
            desc="train teacher",
            unit="step",
            disable=not self.placement.is_writer,
        )
        if self.step and self.step % per_epoch == 0 and self.step < total:
            # Resumed at the end of an epoch: validate as the first run did next.
            self.log_validation()
        first_epoch = (
            self.step // per_epoch if self.step < total else self.config.epochs
        )
        with bar:
            for epoch in range(first_epoch, self.config.epochs):
                skip = self.step - epoch * per_epoch
                for i, examples in enumerate(self.epoch_batches(epoch)):
                    if i < skip:
                        continue
                    loss = self.teacher_step(Batch.from_examples(examples))
                    self.step += 1
                    pending.append(examples)
                    if self.step % self.config.distill_interval == 0:
                        terms = self.student_step(Examples.concat(pending))
                        pending = []
                    if self.step % LOG_EVERY == 0:
                        # The global batch's loss, not this rank's part of it.
                        loss = float(self.placement.mean_count(torch.tensor(loss)))
                        values = {
                            "train/teacher_loss": loss,
                            "train/ema_decay": self.ema.current_decay(),
                            **terms,
                        }
                        self.curves.add(self.step, values)
                    if checkpoints is not None and every and self.step % every == 0:
                        self.save_checkpoint(checkpoints)
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch)
                    if self.step >= total:
                        break
                if self.step % per_epoch == 0 or self.step >= total:
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
            "teacher_steps_per_second": round(
                (self.step - start_step) / max(seconds, 1e-9), 2
            ),
            "world_size": self.placement.world_size,
        }

    def finish_student(self) -> None:
        """Extra distillation passes against the final EMA snapshot, after
        which each student takes the average of its weights over them."""
        if not self.config.student_epochs:
            return
        steps = self.config.student_epochs * self.steps_per_epoch()
        self.start_averages(steps)
        bar = tqdm(
            total=steps,
            desc="distill student",
            unit="step",
            disable=not self.placement.is_writer,
        )
        with bar:
            for epoch in range(self.config.student_epochs):
                for examples in self.epoch_batches(self.config.epochs + epoch):
                    terms = self.student_step(examples)
                    if self.student_steps % LOG_EVERY == 0:
                        self.curves.add(self.step + self.student_steps, terms)
                    bar.update()
        self.average_students()
        self.log_validation()

    def start_averages(self, steps: int) -> None:
        """Starts each student's EMA from its current weights, for the
        ``steps`` student steps to come (``student_ema_decay``).

        No warm-up: the average starts from a trained student, not from its
        initial weights. The decay is at most ``1 - 3 / steps``, so that the
        starting weights keep under 5% of the final average however few the
        steps.
        """
        if not self.config.student_ema_decay:
            return
        decay = min(self.config.student_ema_decay, 1.0 - 3.0 / max(steps, 4))
        if self.placement.sharded:
            if self.placement.is_writer:
                logger.warning(
                    "student_ema_decay is not applied in a sharded run: its "
                    "tables train with fused row-wise Adagrad, which the "
                    "average does not follow; each student keeps its last weights"
                )
            return
        for student in self.students.values():
            student.average = EMA(student.network, decay, warmup=False)

    def average_students(self) -> None:
        """Writes each student's EMA into its network, which is then what is
        saved, quantized and served, and ends the average. The optimizer state
        stays that of the last weights: a student is not trained on from here."""
        for student in self.students.values():
            if student.average is not None:
                student.average.copy_to(student.network)
                student.average = None

    @torch.no_grad()
    def log_validation(self) -> None:
        """Valid loss and AUC of the online teacher, the EMA teacher and the student.

        Under a sharded placement each rank scores its own users and every
        rank judges the gathered scores, so all take the same guard decision.
        """
        label = self.placement.gather(self.valid.label.numpy())
        values = {}
        with self.buffer.read() as snapshot:
            models = {
                "online_teacher": self.teacher,
                "ema_teacher": snapshot.module,
                **{name: s.network for name, s in self.students.items()},
            }
            for name, model in models.items():
                model.eval()
                logit = self.placement.gather(model(self.valid).logit.numpy())
                values[f"valid/{name}/log_loss"] = float(
                    F.binary_cross_entropy_with_logits(
                        torch.from_numpy(logit), torch.from_numpy(label)
                    )
                )
                values[f"valid/{name}/auc"] = float(roc_auc_score(label, logit))
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
        """Writes every network whole, from rank 0; every rank must call."""
        networks = {"online_teacher": (self.teacher, self.teacher_config)}
        with self.buffer.read() as snapshot:
            networks["ema_teacher"] = (snapshot.module, self.teacher_config)
            for name, student in self.students.items():
                networks[name] = (student.network, self.student_config)
            tokens = self.prepared.space.item_tokens
            whole = {
                name: self.placement.unshard(module, config, tokens)
                for name, (module, config) in networks.items()
            }
        if self.placement.sharded or self.config.checkpoint_every:
            # The end, students included: replaces a periodic one of this step,
            # and a --resume of the finished run is refused rather than
            # repeating its end.
            checkpoints = folder / "checkpoints"
            if self.placement.is_writer:
                shutil.rmtree(self._checkpoint_path(checkpoints), ignore_errors=True)
            self.placement.barrier()
            self.save_checkpoint(checkpoints, finished=True)
        if not self.placement.is_writer:
            self.buffer.close()
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.prepared.space.save(folder / "space.json")
        for name, network in whole.items():
            config = (
                self.student_config if name in self.students else self.teacher_config
            )
            save_network(network, config, folder, name)
        extra = []
        if self.adaptive_ema is not None:
            adaptive = copy.deepcopy(self.teacher)
            self.adaptive_ema.copy_to(adaptive)
            save_network(adaptive, self.teacher_config, folder, "ema_teacher_adaptive")
            extra.append("ema_teacher_adaptive")
        (folder / "teachers.json").write_text(json.dumps(extra))
        (folder / "students.json").write_text(json.dumps(list(self.students)))
        if not self.placement.sharded:
            torch.save(
                self.ema.checkpoint(self.teacher, self.teacher_opt),
                folder / "checkpoint.pt",
            )
        (folder / "curves.json").write_text(json.dumps(self.curves.points))
        self.buffer.close()

    # -- checkpoints -------------------------------------------------------------

    def _checkpoint_state(self) -> dict:
        """Everything a resumed run needs, as (sharded) tensors for
        ``torch.distributed.checkpoint``; the EMA shadow travels as the
        published snapshot's weights, sharded like the teacher's."""
        self.buffer.wait()
        if self.buffer.num_updates != self.ema.num_updates:
            self.buffer.publish(self.ema.synced_shadow(), self.ema.num_updates)
            self.buffer.wait()
        with self.buffer.read() as snapshot:
            ema = snapshot.module.state_dict()
        optimizer_state = self.placement.optimizer_state
        return {
            "teacher": self.teacher.state_dict(),
            "teacher_optimizer": optimizer_state(self.teacher, self.teacher_opt),
            "ema": ema,
            "students": {n: s.network.state_dict() for n, s in self.students.items()},
            "student_optimizers": {
                n: optimizer_state(s.network, s.optimizer)
                for n, s in self.students.items()
            },
        }

    def _checkpoint_path(self, folder: Path) -> Path:
        return Path(folder) / f"step-{self.step:08d}"

    def save_checkpoint(self, folder: Path, finished: bool = False) -> Path:
        """Writes ``folder/step-N`` on every rank (collective) and keeps the last two.

        Rank 0 writes ``meta.json`` last: a checkpoint without it is
        incomplete (the run died while writing) and is never resumed from.
        """
        path = self._checkpoint_path(folder)
        dcp.save(self._checkpoint_state(), checkpoint_id=path)
        self.placement.barrier()
        if self.placement.is_writer:
            meta = {
                "step": self.step,
                "student_steps": self.student_steps,
                "world_size": self.placement.world_size,
                "ema": {
                    key: value
                    for key, value in self.ema.state_dict().items()
                    if key not in ("shadow", "copied")
                },
                "guard_best": self.guard.best,
                "finished": finished,
                "curves": self.curves.points,
                "networks": self._network_shapes(),
            }
            (path / "meta.json.tmp").write_text(json.dumps(meta))
            (path / "meta.json.tmp").rename(path / "meta.json")
            for old in complete_checkpoints(folder)[:-2]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint of step %d in %s", self.step, path)
        self.placement.barrier()
        return path

    def _network_shapes(self) -> dict:
        """Both networks' settings, as JSON holds them."""
        shapes = {"teacher": self.teacher_config, "student": self.student_config}
        return json.loads(json.dumps({k: asdict(v) for k, v in shapes.items()}))

    def _check_shapes(self, path: Path, saved: dict | None) -> None:
        """Refuses a checkpoint of networks with other settings (a resume with
        another ``embedding_dim``, say); one written before they were saved
        is not checked here.

        Raises:
            ValueError: naming the settings that differ and the fix.
        """
        if saved is None:
            return
        now = self._network_shapes()
        changed = [
            f"{network}.{key}: {saved.get(network, {}).get(key)!r} -> {value!r}"
            for network, fields in now.items()
            for key, value in fields.items()
            if saved.get(network, {}).get(key) != value
        ]
        if changed:
            raise ValueError(
                f"{path} was written by networks of other settings "
                f"({', '.join(changed[:4])}): resume with the settings it was "
                "written with, or drop --resume to train from the start"
            )

    def load_checkpoint(self, path: Path) -> None:
        """Resumes from a checkpoint of :meth:`save_checkpoint`: same world size."""
        meta = checkpoint_meta(path)
        if meta["world_size"] != self.placement.world_size:
            raise ValueError(
                f"{path} was written by {meta['world_size']} processes; resume it "
                f"with --nproc {meta['world_size']}, not {self.placement.world_size}"
            )
        self._check_shapes(path, meta.get("networks"))
        state = self._checkpoint_state()
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, dcp.CheckpointException) as error:
            # torch gathers each rank's error in a CheckpointException, which
            # is no Exception and whose text is every rank's whole traceback.
            failures = getattr(error, "failures", None) or {0: (error,)}
            cause = next(iter(failures.values()))[0]
            reason = ": ".join(filter(None, (type(cause).__name__, str(cause))))
            raise ValueError(
                f"{path} does not load into this run's networks ({reason}): it "
                "was written with other settings, or a file in it is damaged. "
                "Resume with the settings it was written with, remove the folder "
                "to resume from the checkpoint before it, or drop --resume to "
                "train from the start"
            ) from None
        load_optimizer = self.placement.load_optimizer_state
        self.teacher.load_state_dict(state["teacher"])
        load_optimizer(self.teacher, self.teacher_opt, state["teacher_optimizer"])
        for name, student in self.students.items():
            student.network.load_state_dict(state["students"][name])
            load_optimizer(
                student.network, student.optimizer, state["student_optimizers"][name]
            )
        with self.buffer.read() as snapshot:
            snapshot.module.load_state_dict(state["ema"])
            averaged = dict(named_state(snapshot.module))
        shadow = {n: averaged[n] for n in self.ema.synced_shadow()}
        self.ema.load_state_dict(
            {**meta["ema"], "shadow": shadow, "copied": self.ema.copied}
        )
        self.buffer.publish(self.ema.synced_shadow(), self.ema.num_updates)
        self.guard.best = meta["guard_best"]
        self.curves.points = {
            k: [tuple(p) for p in v] for k, v in meta["curves"].items()
        }
        self.step, self.student_steps = meta["step"], meta["student_steps"]
        logger.info("resumed from %s at step %d", path, self.step)


# What a resume reads from a checkpoint's meta.json.
CHECKPOINT_META = ("step", "student_steps", "world_size", "ema", "guard_best", "curves")


def checkpoint_meta(path: Path) -> dict:
    """The ``meta.json`` of checkpoint ``path``.

    Raises:
        ValueError: it is not a JSON object with every key a resume reads,
            naming the file and the fix (a file cut short or edited by hand
            would otherwise surface as a bare decode or key error).
    """
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except ValueError as error:  # JSONDecodeError, or bytes that are not text
        problem = f"is not valid JSON ({error})"
    else:
        keys = meta if isinstance(meta, dict) else {}
        missing = [k for k in CHECKPOINT_META if k not in keys]
        if not missing:
            return meta
        problem = f"lacks {', '.join(missing)}"
    raise ValueError(
        f"{file} {problem}, so checkpoint {Path(path).name} cannot be resumed: "
        f"remove the folder {path} to resume from the checkpoint before it, or "
        "drop --resume to train from the start"
    )


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints with their ``meta.json``, oldest first."""
    if not Path(folder).is_dir():
        return []
    return sorted(p.parent for p in Path(folder).glob("step-*/meta.json"))


def negative_draw(
    counts: np.ndarray, power: float
) -> tuple[np.ndarray | None, np.ndarray]:
    """How negatives are drawn: each item index's probability, in proportion
    to ``(interactions + 1) ** power`` (None for uniform, at power 0), and
    the log of that probability over a uniform draw's, ``float32``, which
    ranking adds to the interaction logit learned against the draw. Index 0,
    the padding item, is never drawn."""
    uniform = 1.0 / (len(counts) - 1)
    if not power:
        return None, np.zeros(len(counts), np.float32)
    weights = (counts.astype(np.float64) + 1.0) ** power
    weights[0] = 0.0
    probabilities = weights / weights.sum()
    ratio = np.log(np.maximum(probabilities, 1e-30) / uniform)
    ratio[0] = 0.0
    return probabilities, ratio.astype(np.float32)


def network_dims(config: TrainConfig) -> dict:
    """The ``NetworkConfig`` fields that ``config`` sets, for both networks."""
    return {
        "embedding_dim": config.embedding_dim,
        "hidden_dim": config.hidden_dim,
        "history_feedback": config.history_feedback,
        "feedback_ratings": config.history_feedback and config.history_ratings,
        "popularity_offset": config.popularity_offset,
        "negative_popularity": config.negative_popularity,
    }


def distill_weights(config: TrainConfig) -> DistillWeights:
    """The student's loss weights, as configured."""
    return DistillWeights(
        config.distill_label,
        config.distill_embedding,
        config.distill_attention,
        config.distill_click,
        config.distill_ranking,
        config.distill_interact,
    )


def first_items(examples: Examples, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's first ``count`` items and their feedback codes.

    A train example with history length ``n < count`` is the user's event
    number ``n``, so its item is first item ``n``.

    Returns:
        ``[max user id + 1, count]`` item indices and the same of feedback codes.
    """
    rows = int(examples.user_id.max()) + 1
    items = np.zeros((rows, count), np.int64)
    feedback = np.full((rows, count), FEEDBACK_UNKNOWN, np.int64)
    early = np.flatnonzero((examples.history_len < count) & (examples.rated == 1))
    where = examples.user_id[early], examples.history_len[early]
    items[where] = examples.item_idx[early]
    feedback[where] = examples.feedback[early]
    return items, feedback


def run_train(
    config: PipelineConfig,
    variants: dict[str, StudentVariant] | None = None,
    adaptive_ema: bool = False,
    resume: bool = False,
) -> dict:
    """Trains on ``work_dir/ingest`` and writes the networks to ``work_dir/model``.

    With ``train.nproc`` set, outside ``torchrun`` this launches ``torchrun``
    with that many processes of this same function; inside, each process is one
    rank of a sharded run.

    Args:
        resume: continue from the newest complete checkpoint under
            ``work_dir/model/checkpoints``, if there is one.
    """
    if config.train.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_torchrun(config, resume)
    placement = LocalPlacement()
    if config.train.nproc:
        from models.sharding import ShardedPlacement, init_process_group

        device = init_process_group()
        placement = ShardedPlacement(
            config.train.sharding, config.train.table_lr, device
        )
    try:
        return _train(config, variants, adaptive_ema, resume, placement)
    finally:
        placement.close()


def _train(config, variants, adaptive_ema, resume, placement) -> dict:
    shard = (placement.rank, placement.world_size, config.train.data_shards)
    prepared = prepare(config.work_dir, config.train.max_history, shard=shard)
    # The data's stamp, read before training: the data trained on, and an
    # unreadable stamp stops the step before its work rather than after.
    ingested = read_lineage(ingest_dir(config.work_dir)).get("ingested")
    folder = model_dir(config.work_dir)
    checkpoints = folder / "checkpoints"
    with (
        tracked_run(config) if placement.is_writer else contextlib.nullcontext() as run
    ):
        trainer = Trainer(
            prepared,
            config.train,
            variants,
            adaptive_ema,
            folder / "snapshots",
            placement,
        )
        if resume:
            check_resumable(checkpoints, config.train.checkpoint_every)
            trainer.load_checkpoint(complete_checkpoints(checkpoints)[-1])
        # Once the run can start: a refused resume leaves the run's record alone.
        if placement.is_writer:
            _log_train_params(run, config)
        summary = trainer.run(checkpoints)
        if placement.is_writer:
            # The old stamp must not vouch for the networks about to replace
            # those it was written for: it is written again once all is done.
            (folder / LINEAGE).unlink(missing_ok=True)
        trainer.save(folder)
        if placement.is_writer:
            mlflow.log_metrics({f"train/{k}": float(v) for k, v in summary.items()})
    if placement.is_writer:
        (folder / "train_summary.json").write_text(json.dumps(summary, indent=2))
        write_lineage(folder, trained=stamp(), ingested=ingested)
    return summary


def check_resumable(checkpoints: Path, every: int) -> None:
    """Refuses a resume with nothing to resume from, or whose newest
    checkpoint is its end.

    Without a complete checkpoint, training from the start with a warning
    in the log would start over a run the user meant to continue (one begun
    without ``--checkpoint-every``, say) and spend the hours a resume is
    for. Only a person asks for a resume (the weekly DAG's train task never
    does: a retried task trains from the start), so the refusal costs one
    command without the flag.

    Args:
        every: ``train.checkpoint_every`` (0: the run writes none).

    Raises:
        ValueError: nothing to resume from, or the run finished; resuming
            would start over or only repeat its last part.
    """
    done = complete_checkpoints(checkpoints)
    if not done:
        started = Path(checkpoints).is_dir() and any(Path(checkpoints).glob("step-*"))
        if started:
            why = "only incomplete ones (the run was stopped while writing its first)"
        elif not every:
            why = "none (train.checkpoint_every is 0: --checkpoint-every writes them)"
        else:
            why = f"none (the run stopped before its first, at step {every})"
        raise ValueError(
            f"--resume: {checkpoints} holds no complete checkpoint to resume from, "
            f"{why}. Drop --resume to train this run from the start"
        )
    if checkpoint_meta(done[-1]).get("finished"):
        raise ValueError(
            f"{done[-1]} is the end of a finished run: nothing to resume. Train "
            "longer in a new --work-dir, or drop --resume to start this one over"
        )


def _log_train_params(run, config: PipelineConfig) -> None:
    """Logs the train settings; a second train of the same run (a resume, or
    other settings) keeps the first values, which MLflow cannot change, and
    records the new ones as ``latest.train.*`` tags."""
    params = flatten("train", config.train.model_dump())
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != str(v)}
    if changed:
        logger.warning(
            "this run was first trained with other settings; MLflow keeps the first "
            "values of %s, the new ones are tagged latest.*",
            sorted(changed),
        )
        mlflow.set_tags({f"latest.{k}": v for k, v in changed.items()})
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def launch_torchrun(config: PipelineConfig, resume: bool) -> dict:
    """Runs the train step as ``train.nproc`` local processes under ``torchrun``.

    For several machines, run ``torchrun`` yourself on each (see the README)
    with ``-m pipeline.train --config FILE``.
    """
    if config.train.sharding == "row_wise" and not torch.cuda.is_available():
        raise ValueError(
            "--sharding row_wise needs CUDA: TorchRec shards tables row-wise on GPUs "
            "only; on CPU use table_wise or column_wise"
        )
    train = config.train
    empty = ranks_without_training_rows(config.work_dir, train.nproc, train.data_shards)
    if empty:
        raise ValueError(
            f"{len(empty)} of {train.nproc} processes would have no training "
            f"rows (ranks {empty}): no warm user with a training event falls in "
            f"their data shards (user_id % {train.data_shards}); the log is too "
            "small to split over this many processes. Train with fewer "
            "(--nproc), or in one (--nproc 0)"
        )
    folder = model_dir(config.work_dir)
    if resume:
        check_resumable(folder / "checkpoints", train.checkpoint_every)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_config.json"
    config.save(path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={config.train.nproc}", "-m", "pipeline.train",
        "--config", str(path), *(["--resume"] if resume else []),
    ]  # fmt: skip
    logger.info("launching %s", " ".join(command))
    done = subprocess.run(command, check=False)
    if done.returncode:
        again = f"emarec train --work-dir {config.work_dir} --nproc {train.nproc}"
        if complete_checkpoints(folder / "checkpoints"):
            hint = f"Resume with `{again} --resume`"
        else:
            hint = f"No checkpoint was written: run `{again}` again from the start"
        raise RuntimeError(
            f"torchrun exited with {done.returncode}; the ranks' errors are "
            f"above. {hint}"
        )
    return json.loads((folder / "train_summary.json").read_text())


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def end_with_the_launcher() -> None:
    """Has this process sent SIGTERM when its parent, the torchrun agent,
    dies. torchrun starts each rank in a session of its own: an agent killed
    outright (SIGKILL, the out-of-memory killer) would otherwise leave its
    ranks training on as orphans, writing checkpoints a resumed run races.
    Linux only (``prctl``); elsewhere orphans must be stopped by hand."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the agent died before the call
        os.kill(os.getpid(), signal.SIGTERM)



def main(argv: list[str] | None = None) -> int:
    """One rank of a sharded train step: ``torchrun ... -m pipeline.train``."""
    if "LOCAL_RANK" in os.environ:
        end_with_the_launcher()
    parser = argparse.ArgumentParser(prog="python -m pipeline.train")
    parser.add_argument(
        "--config", type=Path, required=True, help="a PipelineConfig file"
    )
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    # force: importing TorchRec has already configured the root logger.
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank {os.environ.get('RANK', 0)} %(levelname)s %(name)s: "
        "%(message)s",
        force=True,
    )
    config = PipelineConfig.from_file(args.config)
    if not config.train.nproc:
        train = config.train.model_copy(update={"nproc": 1})
        config = config.model_copy(update={"train": train})
    run_train(config, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
