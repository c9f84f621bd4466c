"""Guards around the EMA teacher: divergence rollback and a snapshot window.

:class:`DivergenceGuard` watches the EMA teacher's validation loss; a NaN, an
infinity or a jump beyond ``threshold`` times the best loss so far restores the
last shadow that passed and shortens the EMA's horizon, so the teacher drops
the bad stretch and re-couples to the online model sooner.
:class:`SnapshotWindow` keeps the last few shadows on disk with their metric,
for rollback when the teacher slowly forgets rather than blows up.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from models.ema import EMA

logger = logging.getLogger(__name__)

WINDOW_FILE = "window.json"


class SnapshotWindow:
    """The last ``keep`` EMA shadows on disk, each with its validation metric.

    Each save writes ``snapshot-{step}.pt`` (a flat dict of tensors, readable
    with ``torch.load(weights_only=True)``) and rewrites ``window.json``
    (``{"keep": N, "snapshots": [{"step", "metric", "file"}, ...]}``, oldest
    first); snapshots beyond the last ``keep`` are deleted. A folder that
    already holds a window is picked up where it was left.

    Args:
        folder: where the snapshots live; created if needed.
        keep: how many snapshots to keep, at least 1.

    Raises:
        ValueError: if ``keep < 1``.
    """

    def __init__(self, folder: str | Path, keep: int = 5):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = self._read_index()

    def _read_index(self) -> list[dict]:
        index = self.folder / WINDOW_FILE
        if not index.exists():
            return []
        entries = json.loads(index.read_text())["snapshots"]
        logger.info("snapshot window %s: %d snapshots on disk", index, len(entries))
        return entries

    @property
    def steps(self) -> list[int]:
        """Steps of the snapshots on disk, oldest first."""
        return [entry["step"] for entry in self.entries]

    def save(self, ema: EMA, metric: float, step: int) -> Path:
        """Writes the EMA's up-to-date shadow and drops the oldest beyond ``keep``.

        Args:
            ema: the EMA to snapshot.
            metric: its validation metric, lower is better; a non-finite value
                is recorded as ``null`` and never counts as best.
            step: the training step; saving a step again replaces it.

        Returns:
            The path of the snapshot file.
        """
        tensors = {**ema.synced_shadow(), **ema.copied}
        path = self.folder / f"snapshot-{step}.pt"
        _atomic_save(tensors, path)
        value = float(metric) if math.isfinite(metric) else None
        self.entries = [e for e in self.entries if e["step"] != step]
        self.entries.append({"step": step, "metric": value, "file": path.name})
        self.entries.sort(key=lambda entry: entry["step"])
        self._drop_old()
        self._write_index()
        return path

    def _drop_old(self) -> None:
        while len(self.entries) > self.keep:
            old = self.entries.pop(0)
            (self.folder / old["file"]).unlink(missing_ok=True)
            logger.debug("dropped EMA snapshot of step %d", old["step"])

    def _write_index(self) -> None:
        index = {"keep": self.keep, "snapshots": self.entries}
        tmp = self.folder / f"{WINDOW_FILE}.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.folder / WINDOW_FILE)

    def best(self) -> int | None:
        """The step of the kept snapshot with the lowest metric, if any."""
        scored = [e for e in self.entries if e["metric"] is not None]
        if not scored:
            return None
        return min(scored, key=lambda entry: (entry["metric"], -entry["step"]))["step"]

    def latest(self) -> int | None:
        """The step of the newest snapshot, if any."""
        return self.entries[-1]["step"] if self.entries else None

    def load(self, step: int) -> dict[str, torch.Tensor]:
        """Reads one snapshot back.

        Args:
            step: a step in :attr:`steps`.

        Returns:
            Tensor name to tensor, for ``EMA.load_shadow``.

        Raises:
            KeyError: if no snapshot of that step is kept.
        """
        for entry in self.entries:
            if entry["step"] == step:
                return torch.load(self.folder / entry["file"], weights_only=True)
        raise KeyError(f"no snapshot of step {step}; kept: {self.steps}")

    def restore(self, ema: EMA, step: int) -> None:
        """Rolls ``ema`` back to the snapshot of ``step``."""
        ema.load_shadow(self.load(step))
        logger.info("EMA rolled back to the snapshot of step %d", step)


class DivergenceGuard:
    """Rolls the EMA back and shortens its horizon when its teacher diverges.

    A check fails on a NaN or infinite loss, or on a loss above
    ``best + (threshold - 1) * |best|`` (``threshold`` times the best for the
    usual positive losses). On a pass, the current shadow becomes the last good
    one (kept in memory, or saved to a :class:`SnapshotWindow`). On a failure
    the last good shadow is restored and the EMA's *active* decay is lowered so
    its horizon halves, at most 0.99 and at least ``min_decay``:
    ``min(0.99, 1 - 2 * (1 - active))`` - 0.995 becomes 0.99, then 0.98, 0.96.
    The configured decay stays as it was.

    Args:
        ema: the EMA to guard.
        store: ``None`` to keep the last good shadow in memory (one copy of
            the shadow); a :class:`SnapshotWindow` to keep it on disk instead;
            or a publisher with ``publish(shadow, num_updates)`` (the
            ``DoubleBuffer``), which also gets the restored shadow, so readers
            stop seeing the diverged teacher.
        threshold: how many times the best loss counts as a jump, above 1.
        min_decay: the lowest active decay a failure may set.

    Raises:
        ValueError: if ``threshold <= 1``.
    """

    def __init__(
        self,
        ema: EMA,
        store: SnapshotWindow | object | None = None,
        threshold: float = 1.5,
        min_decay: float = 0.9,
    ):
        if threshold <= 1.0:
            raise ValueError(f"threshold must be above 1, got {threshold}")
        self.ema = ema
        self.window = store if isinstance(store, SnapshotWindow) else None
        self.publisher = store if hasattr(store, "publish") else None
        self.threshold = threshold
        self.min_decay = min_decay
        self.best = math.inf
        self.trips = 0
        self._good: dict[str, torch.Tensor] | None = None
        self._good_step: int | None = None

    def check(self, valid_loss: float) -> bool:
        """Judges the EMA teacher's validation loss; rolls back on divergence.

        Args:
            valid_loss: the EMA teacher's loss on the validation set.

        Returns:
            True if the loss passed, False if it tripped the guard.
        """
        loss = float(valid_loss)
        if math.isfinite(loss) and not self._jumped(loss):
            self.best = min(self.best, loss)
            self._keep_good(loss)
            return True
        self._trip(loss)
        return False

    def _jumped(self, loss: float) -> bool:
        if not math.isfinite(self.best):
            return False
        return loss > self.best + (self.threshold - 1.0) * abs(self.best)

    def _keep_good(self, loss: float) -> None:
        if self.window is not None:
            self._good_step = self.ema.num_updates
            self.window.save(self.ema, loss, self._good_step)
        else:
            self._good = {
                name: tensor.clone()
                for name, tensor in self.ema.synced_shadow().items()
            }

    def _trip(self, loss: float) -> None:
        self.trips += 1
        before = self.ema.active_decay
        lowered = max(self.min_decay, min(0.99, 1.0 - 2.0 * (1.0 - before)))
        self.ema.set_active_decay(min(before, lowered))
        restored = self._restore()
        logger.warning(
            "EMA teacher diverged (valid loss %s, best %s): %s, active decay "
            "%.6g -> %.6g",
            loss,
            self.best,
            "restored the last good shadow" if restored else "no good shadow yet",
            before,
            self.ema.active_decay,
        )
        if restored and self.publisher is not None:
            self.publisher.publish(self.ema.synced_shadow(), self.ema.num_updates)

    def _restore(self) -> bool:
        if self.window is not None and self._good_step in self.window.steps:
            self.window.restore(self.ema, self._good_step)
            return True
        if self._good is not None:
            self.ema.load_shadow(self._good)
            return True
        return False


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Saves through a temporary file so a crash never leaves half a snapshot."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)
