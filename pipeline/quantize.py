"""Quantize: the float student becomes the INT8 student that serves new users."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import torch

from data.features import FeatureSpace
from models.network import Batch
from models.quantize import embedding_bytes, quantize_student
from models.store import load_network, save_network
from pipeline.config import PipelineConfig
from pipeline.lineage import QUANTIZE, stamp, trained_stamp, write_json
from pipeline.prepare import prepare
from pipeline.tracking import tracked_run
from pipeline.train import model_dir

logger = logging.getLogger(__name__)


# Warm validation rows that calibrate the static INT8 head, scored against the
# whole catalogue in batches of serving's size.
CALIBRATION_ROWS = 256
CALIBRATION_BATCH = 64


def calibration_batches(valid, seed: int) -> list[Batch]:
    """Up to ``CALIBRATION_ROWS`` rows of ``valid``, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(valid), size=min(CALIBRATION_ROWS, len(valid)), replace=False)
    return [
        Batch.from_examples(valid.take(rows[start : start + CALIBRATION_BATCH]))
        for start in range(0, len(rows), CALIBRATION_BATCH)
    ]


def run_quantize(config: PipelineConfig) -> dict:
    """Writes ``student_int8`` beside the float student and logs what was done.

    ``quantize.json``, whose stamp vouches for the INT8 student to evaluate
    and register, is removed before the student is replaced and written
    only once the MLflow logging has succeeded: a quantize that fails midway
    leaves an INT8 student that nothing vouches for, which register refuses.
    """
    folder = model_dir(config.work_dir)
    trained = trained_stamp(config.work_dir)
    space = FeatureSpace.load(folder / "space.json")
    student = load_network(folder, "student", space)
    prepared = prepare(config.work_dir, config.train.max_history, space)
    valid = prepared.select("warm", "valid")
    sample = Batch.from_examples(valid.take(np.arange(min(16, len(valid)))))
    candidates = torch.arange(space.num_items)
    quantized, info = quantize_student(
        student,
        sample,
        candidates,
        config.train.quantize_dense,
        calibration=calibration_batches(valid, config.train.seed),
    )
    (folder / QUANTIZE).unlink(missing_ok=True)
    save_network(quantized, student.config, folder, "student_int8", quantized=info)
    info["float_embedding_bytes"] = embedding_bytes(student)
    info["int8_embedding_bytes"] = embedding_bytes(quantized)
    info["trained"] = trained
    info["quantized"] = stamp()
    logger.info(
        "INT8 student: tables %s, dense %s, embedding bytes %d -> %d",
        info["embedding_tables"],
        info["dense"],
        info["float_embedding_bytes"],
        info["int8_embedding_bytes"],
    )
    with tracked_run(config):
        mlflow.log_dict(info, "model/quantize.json")
        mlflow.log_metric(
            "quantize/embedding_size_ratio",
            info["float_embedding_bytes"] / max(1, info["int8_embedding_bytes"]),
        )
    write_json(folder / QUANTIZE, info)
    return info
