"""One rank of the sharded-EMA check, run by the tests under ``torchrun``.

Each rank trains its shard of the teacher and keeps the EMA of its own rows
(lazily: only the rows a batch looked up catch up). After every step rank 0
also gathers the whole teacher and folds it into a plain dense EMA, the
reference. At the end the sharded EMA, gathered once, must equal it.

Usage: ``torchrun --nproc-per-node 2 tests/sharded_ema_check.py WORK_DIR OUT.json STEPS``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from models.ema import EMA
from models.network import Batch
from models.sharding import ShardedPlacement, init_process_group
from pipeline.config import TrainConfig
from pipeline.prepare import prepare
from pipeline.train import Trainer


def main(work_dir: str, out: str, steps: int) -> None:
    init_process_group()
    placement = ShardedPlacement("table_wise")
    config = TrainConfig(background_sync=False, student_epochs=0)
    shard = (placement.rank, placement.world_size, config.data_shards)
    prepared = prepare(Path(work_dir), 20, shard=shard)
    trainer = Trainer(prepared, config, placement=placement)
    tokens = prepared.space.item_tokens

    def whole():
        return placement.unshard(trainer.teacher, trainer.teacher_config, tokens)

    start = whole()
    reference = EMA(start, config.ema_decay, warmup=config.ema_warmup) if start else None
    local_rows = {
        name: tuple(trainer.ema.shadow[name].shape) for name in trainer.ema.lazy_tables
    }
    batches = trainer.epoch_batches(0)
    for _, examples in zip(range(steps), batches):
        trainer.teacher_step(Batch.from_examples(examples))
        network = whole()
        if reference is not None:
            reference.update(network)
    trainer.buffer.publish(trainer.ema.synced_shadow(), trainer.ema.num_updates)
    with trainer.buffer.read() as snapshot:
        averaged = placement.unshard(snapshot.module, trainer.teacher_config, tokens)
    report = {"rank": placement.rank, "lazy_tables": local_rows}
    if placement.is_writer:
        sharded = averaged.state_dict()
        report["max_abs_diff"] = {
            name: float((sharded[name] - tensor).abs().max())
            for name, tensor in reference.shadow.items()
            if name in sharded
        }
        report["table_rows"] = {
            name: tuple(tensor.shape)
            for name, tensor in sharded.items()
            if ".embedding_bags." in name
        }
    parts = placement.gather_objects(report)
    if placement.is_writer:
        Path(out).write_text(json.dumps(parts))
    placement.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
