"""``emarec plan``: the sharding plan and per-rank memory of a model too big for here.

Builds the teacher for the given sizes on the meta device (nothing allocated),
runs TorchRec's planner for ``world_size`` CUDA ranks, and adds what the
planner does not count: the EMA's float32 shadow of every local shard, and the
bytes the EMA moves per step, dense and lazy.

Assumptions, printed with the figures: float32 weights; fused exact row-wise
Adagrad for the tables (one float32 per row); Adam for the dense layers (two
moments); the lazy EMA touches, per table, the rows a global batch looks up
(user tables one per example, item tables ``history + 1`` per example), spread
over a table's shards in proportion to their rows; a touched row costs its
weights read, shadow read and written (12 bytes a float) plus its 8-byte
counter read and written. Duplicate lookups are not removed, so the lazy
figures are upper bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.network import NetworkConfig, RecNetwork
from models.sharding import TABLE_MODULES, plan_network

FLOAT = 4
EMA_BYTES_PER_FLOAT = 12  # read weight, read shadow, write shadow
COUNTER_BYTES = 16  # the row's int64 "last synced" counter, read and written
ADAM_MOMENTS = 2
# Side features of MovieLens shape: the user and id tables dominate anyway.
USER_FEATURES = {"age": 8, "gender": 3, "occupation": 22, "zip": 1000}
ITEM_FEATURES = {"genres": 20}


@dataclass
class RankMemory:
    """One rank's bytes: its table shards, their optimizer state and EMA shadow."""

    weights: int = 0
    optimizer: int = 0
    ema: int = 0
    ema_dense_step: int = 0
    ema_lazy_step: float = 0.0
    shards: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.ema


def paper_network(users: int, items: int, dim: int, hidden: int) -> RecNetwork:
    """The teacher for these sizes, on the meta device."""
    config = NetworkConfig(
        num_users=users + 1,
        num_items=items + 1,
        user_vocab_sizes=tuple(USER_FEATURES.values()),
        item_vocab_sizes=tuple(ITEM_FEATURES.values()),
        user_feature_names=tuple(USER_FEATURES),
        item_feature_names=tuple(ITEM_FEATURES),
        embedding_dim=dim,
        hidden_dim=hidden,
    )
    with torch.device("meta"):
        # One genre per item: only the token table's size matters here.
        return RecNetwork(config, {"genres": [[1]] * items})


def plan_memory(
    users: int,
    items: int,
    dim: int,
    world_size: int,
    sharding: str = "auto",
    hidden: int = 256,
    batch_size: int = 65536,
    history: int = 20,
    hbm_gb: float = 80.0,
) -> tuple[object, list[RankMemory], int]:
    """TorchRec's plan and every rank's memory and EMA traffic.

    Returns:
        The sharding plan, one :class:`RankMemory` per rank, and the bytes of
        the replicated dense layers (with their Adam moments and EMA shadow).
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    network = paper_network(users, items, dim, hidden)
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
    sharders = [EmbeddingBagCollectionSharder(fused_params=fused)]
    hbm = int(hbm_gb * 1024**3)
    plan = plan_network(network, world_size, sharding, sharders, "cuda", hbm)
    ranks = [RankMemory() for _ in range(world_size)]
    lookups = {"user_tables": batch_size, "item_tables": batch_size * (history + 1)}
    for module in TABLE_MODULES:
        configs = {c.name: c for c in getattr(network, module).embedding_bag_configs()}
        for table, option in plan.get_plan_for_module(module).items():
            rows_total = configs[table].num_embeddings
            touched = min(rows_total, lookups[module])
            for shard in option.sharding_spec.shards:
                rank = ranks[shard.placement.rank()]
                rows, cols = shard.shard_sizes
                rank.weights += rows * cols * FLOAT
                rank.optimizer += rows * FLOAT
                rank.ema += rows * cols * FLOAT
                rank.ema_dense_step += rows * cols * EMA_BYTES_PER_FLOAT
                share = touched * rows / rows_total
                rank.ema_lazy_step += share * (cols * EMA_BYTES_PER_FLOAT + COUNTER_BYTES)
                rank.shards.append(f"{table}[{option.sharding_type}]")
    dense = sum(
        p.numel() for n, p in network.named_parameters() if ".embedding_bags." not in n
    )
    dense_bytes = dense * FLOAT * (1 + ADAM_MOMENTS + 1)  # weights, moments, shadow
    return plan, ranks, dense_bytes


def format_plan(plan, ranks: list[RankMemory], dense_bytes: int, hbm_gb: float) -> str:
    """The plan per table, then one line per rank, in GiB and MiB."""
    gb, mb = 1024**3, 1024**2
    lines = ["tables:"]
    for module in TABLE_MODULES:
        for table, option in plan.get_plan_for_module(module).items():
            where = sorted({s.placement.rank() for s in option.sharding_spec.shards})
            span = f"ranks {where[0]}-{where[-1]}" if len(where) > 1 else f"rank {where[0]}"
            lines.append(
                f"  {table:<14} {option.sharding_type:<18} {option.compute_kernel:<6} "
                f"{len(option.sharding_spec.shards):>3} shards on {span}"
            )
    lines.append(f"dense layers, replicated on every rank: {dense_bytes / mb:.1f} MiB")
    lines.append(
        f"{'rank':>4} {'weights GiB':>11} {'optim GiB':>9} {'EMA GiB':>8} {'total GiB':>9} "
        f"{'EMA dense GiB/step':>18} {'EMA lazy MiB/step':>17}"
    )
    for i, rank in enumerate(ranks):
        over = "  over HBM" if (rank.total + dense_bytes) / gb > hbm_gb else ""
        lines.append(
            f"{i:>4} {rank.weights / gb:>11.2f} {rank.optimizer / gb:>9.3f} "
            f"{rank.ema / gb:>8.2f} {(rank.total + dense_bytes) / gb:>9.2f} "
            f"{rank.ema_dense_step / gb:>18.3f} {rank.ema_lazy_step / mb:>17.2f}{over}"
        )
    dense_step = sum(r.ema_dense_step for r in ranks)
    lazy_step = sum(r.ema_lazy_step for r in ranks)
    lines.append(
        f"EMA bytes moved per step, all ranks: dense {dense_step / gb:.2f} GiB, lazy "
        f"{lazy_step / mb:.1f} MiB ({dense_step / max(lazy_step, 1):.0f}x less)"
    )
    if any((r.total + dense_bytes) / gb > hbm_gb for r in ranks):
        lines.append(
            f"some ranks exceed {hbm_gb:g} GiB: the planner does not count the EMA "
            "shadow; use --sharding row_wise, more ranks, or a smaller dim"
        )
    return "\n".join(lines)
