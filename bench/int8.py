"""INT8 student against the float student: embedding bytes and batch scoring speed.

Batch inference is serving's shape: a batch of new users, each scored against
the whole catalogue. Float, INT8 tables, INT8 tables plus dynamic INT8
dense layers, and INT8 tables plus the static INT8 head (calibrated on other
users than the timed ones) are timed interleaved, best of several repetitions
each.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from data.examples import build_examples
from data.features import FeatureSpace
from data.load import load_data
from data.locate import resolve_data
from data.split import split_interactions
from models.network import Batch, NetworkConfig, RecNetwork
from models.quantize import (
    embedding_bytes,
    quantize_dense,
    quantize_head,
    quantize_tables,
)
from pipeline.config import TrainConfig
from pipeline.train import network_dims

USERS = 64
REPEATS = 15


def student_and_batches() -> tuple[RecNetwork, Batch, Batch, torch.Tensor]:
    """A float student shaped as training's defaults shape it (fixed random
    weights), the timed batch and a calibration batch (``USERS`` rows each,
    with a history of at least 5), and every item index."""
    defaults = TrainConfig()
    loaded = load_data(resolve_data())
    events = split_interactions(loaded.interactions)
    warm = events.loc[events.cohort == "warm", "user_id"].unique().tolist()
    space = FeatureSpace.build(
        loaded.users, loaded.items, loaded.user_features, loaded.item_features, warm
    )
    users = space.encode_users(loaded.users)
    examples = build_examples(events, space, users, defaults.max_history)
    torch.manual_seed(0)
    dims = network_dims(defaults)
    config = NetworkConfig.from_space(space, use_user_id=False, **dims)
    student = RecNetwork(config, space.item_tokens)
    rows = np.flatnonzero(examples.history_len >= 5)
    timed, calibration = (
        Batch.from_examples(examples.take(rows[start : start + USERS])) for start in (0, USERS)
    )
    return student.eval(), timed, calibration, torch.arange(space.num_items)


@torch.no_grad()
def best_ms(models: dict, batch: Batch, candidates: torch.Tensor) -> dict[str, float]:
    best = {name: float("inf") for name in models}
    for model in models.values():
        model.score_candidates(batch, candidates)  # warm-up
    for _ in range(REPEATS):
        for name, model in models.items():
            start = time.perf_counter()
            model.score_candidates(batch, candidates)
            best[name] = min(best[name], (time.perf_counter() - start) * 1000)
    return best


def run() -> dict:
    student, batch, calibration, candidates = student_and_batches()
    tables = quantize_tables(student)
    models = {
        "float": student,
        "int8_tables": tables,
        "int8_all": quantize_dense(tables),
        "int8_static": quantize_head(tables, [calibration], candidates),
    }
    ms = best_ms(models, batch, candidates)
    fastest = min(("int8_tables", "int8_all", "int8_static"), key=ms.get)
    print(f"batch of {USERS} users x {len(candidates)} items:")
    for name, value in ms.items():
        print(f"  {name:12s} {value:8.2f} ms")
    return {
        "int8_embedding_size_ratio": embedding_bytes(student) / embedding_bytes(tables),
        "int8_batch_speedup": ms["float"] / ms[fastest],
        "int8_batch_fastest": fastest,
        "int8_float_batch_ms": ms["float"],
        "int8_tables_batch_ms": ms["int8_tables"],
        "int8_all_batch_ms": ms["int8_all"],
        "int8_static_batch_ms": ms["int8_static"],
    }
