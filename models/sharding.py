"""Where the networks live: one process, or TorchRec-sharded over a process group.

The trainer asks a placement to build its networks and optimizers, to say which
table rows a step touched, and to hand back whole networks for writing. Two
placements answer the same questions:

- ``LocalPlacement``: plain modules in this process, torch Adam for every
  parameter. The default of ``emarec train``.
- ``ShardedPlacement``: ``DistributedModelParallel`` over a ``torch.distributed``
  process group (gloo on CPU, NCCL on CUDA), one process per rank, launched by
  ``torchrun``. TorchRec's planner shards the embedding tables (table-wise or
  row-wise); the dense layers are replicated and kept equal by DDP. Tables
  train with FBGEMM's fused exact row-wise Adagrad inside the backward pass, the
  dense layers with Adam.

FBGEMM's CPU kernels offer only exact SGD, Adagrad and row-wise Adagrad for
fused tables, so a sharded run's tables do not train with Adam: a sharded run
compares with another sharded run (``--nproc 1`` against ``--nproc 2``), not
with the local default. Fused row-wise Adagrad leaves rows that no batch looked
up unchanged, which makes the EMA's lazy row-wise update exact on every shard.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models.network import NetworkConfig, RecNetwork

logger = logging.getLogger(__name__)

SHARDING_TYPES = ("table_wise", "column_wise", "row_wise")
CPU_SHARDING_TYPES = ("table_wise", "column_wise")  # what TorchRec plans on CPU
TABLE_MODULES = ("user_tables", "item_tables")


def table_param(module: str, feature: str) -> str:
    """The parameter name of a feature's table, as the EMA and the optimizer see it."""
    return f"{module}.embedding_bags.t_{feature}.weight"


class LocalPlacement:
    """Everything in this process: plain modules, Adam over all parameters."""

    rank, world_size, sharded = 0, 1, False

    @property
    def is_writer(self) -> bool:
        return True

    def wrap(self, network: RecNetwork, trainable: bool = True) -> nn.Module:
        return network

    def optimizer(self, module: nn.Module, lr: float, weight_decay: float = 0.0):
        return torch.optim.Adam(module.parameters(), lr, weight_decay=weight_decay)

    def lazy_tables(self, module: nn.Module) -> list[str]:
        """Tables averaged row by row: none, as Adam moves every row."""
        return []

    @contextmanager
    def touched_rows(self, module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Rows of the lazy tables the forward inside the block looks up: none."""
        yield {}

    def unshard(self, module: nn.Module, config: NetworkConfig, item_tokens) -> nn.Module:
        return module

    def gather(self, array: np.ndarray) -> np.ndarray:
        return array

    def gather_objects(self, value) -> list:
        return [value]

    def max_int(self, value: int) -> int:
        return value

    def mean_count(self, count: torch.Tensor) -> torch.Tensor:
        """The divisor of a masked mean over this batch: its own count."""
        return count

    def optimizer_state(self, module: nn.Module, optimizer) -> dict:
        """The optimizer's state keyed by parameter name, for a checkpoint."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer)

    def load_optimizer_state(self, module: nn.Module, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Shard:
    """The rows ``[offset, offset + rows)`` of one table that live on this rank."""

    offset: int
    rows: int


class ShardedPlacement:
    """TorchRec ``DistributedModelParallel`` over the default process group.

    Args:
        sharding: ``table_wise``, ``column_wise`` or (CUDA only) ``row_wise``,
            for every table.
        table_lr: learning rate of the fused row-wise Adagrad of the tables.
        device: ``cpu``, or the CUDA device of this rank.

    The process group must be initialised (see :func:`init_process_group`).
    """

    sharded = True

    def __init__(self, sharding: str = "table_wise", table_lr: float = 0.05, device=None):
        if sharding not in SHARDING_TYPES:
            raise ValueError(f"sharding must be one of {SHARDING_TYPES}, not {sharding!r}")
        if not dist.is_initialized():
            raise RuntimeError("ShardedPlacement needs an initialised process group")
        self.sharding, self.table_lr = sharding, table_lr
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device or "cpu")
        if self.device.type == "cpu" and sharding not in CPU_SHARDING_TYPES:
            raise ValueError(
                f"TorchRec shards tables {sharding} on CUDA only; on CPU use "
                f"sharding {' or '.join(CPU_SHARDING_TYPES)}"
            )
        self._plans: dict[NetworkConfig, object] = {}
        self._local: dict[NetworkConfig, dict[str, _Shard]] = {}

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- building ----------------------------------------------------------------

    def _sharders(self) -> list:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": self.table_lr}
        return [EmbeddingBagCollectionSharder(fused_params=fused)]

    def plan(self, network: RecNetwork):
        """The planner's sharding plan for a network of this config, made once."""
        if network.config not in self._plans:
            self._plans[network.config] = plan_network(
                network, self.world_size, self.sharding, self._sharders(), self.device.type
            )
        return self._plans[network.config]

    def wrap(self, network: RecNetwork, trainable: bool = True) -> nn.Module:
        """Shards ``network``'s tables; every rank passes an identical network.

        A module that does not train (a teacher snapshot) gets no DDP wrapper.
        """
        from torchrec.distributed.model_parallel import (
            DefaultDataParallelWrapper,
            DistributedModelParallel,
        )
        from torchrec.distributed.types import ShardingEnv

        tables = {k: t.detach().clone() for k, t in network.state_dict().items()}
        # TorchRec draws fresh table weights for the shards, from the global
        # generator: keep it where it was, then copy the network's own weights
        # in, so every world size starts from the same model.
        with torch.random.fork_rng(devices=[]):
            module = DistributedModelParallel(
                network,
                env=ShardingEnv.from_process_group(dist.group.WORLD),
                device=self.device,
                plan=self.plan(network),
                sharders=self._sharders(),
                init_data_parallel=trainable,
                # DDP's static-graph mode finds the gradients to reduce through the
                # forward's tensor outputs, and the network returns a dataclass.
                data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False),
            )
        _load_local_shards(module, tables)
        module.network_config = network.config
        return module

    def optimizer(self, module: nn.Module, lr: float, weight_decay: float = 0.0):
        """Adam for the dense layers beside the tables' fused optimizer."""
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

        fused = module.fused_optimizer
        # Tables held by other ranks show here as empty placeholders: not dense.
        dense = {
            k: p for k, p in module.named_parameters() if ".embedding_bags." not in k
        }
        adam = KeyedOptimizerWrapper(
            dense, lambda params: torch.optim.Adam(params, lr, weight_decay=weight_decay)
        )
        return CombinedOptimizer([fused, adam])

    # -- tables --------------------------------------------------------------------

    def _shards(self, module: nn.Module) -> dict[str, _Shard]:
        """This rank's part of every table, by parameter name (made once per
        network config: every teacher step asks)."""
        if module.network_config in self._local:
            return self._local[module.network_config]
        shards = self._local[module.network_config] = {}
        for table_module in TABLE_MODULES:
            for table, option in self.plan_for(module, table_module).items():
                feature = table.removeprefix("t_")
                for shard in option.sharding_spec.shards:
                    if shard.placement.rank() == self.rank:
                        shards[table_param(table_module, feature)] = _Shard(
                            shard.shard_offsets[0], shard.shard_sizes[0]
                        )
        return shards

    def plan_for(self, module: nn.Module, table_module: str) -> dict:
        plan = self._plans[module.network_config]
        return plan.get_plan_for_module(table_module) or {}

    def lazy_tables(self, module: nn.Module) -> list[str]:
        """This rank's table shards: fused row-wise Adagrad moves only looked-up rows."""
        return sorted(self._shards(module))

    @contextmanager
    def touched_rows(self, module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Collects the rows of this rank's shards that the forward inside the
        block looks up, on any rank; filled when the block exits.

        Yields:
            Table parameter name to local row indices ``LongTensor [R]``.
        """
        seen: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for table_module in TABLE_MODULES:

            def record(_, args, table_module=table_module) -> None:
                features = args[0]
                for key in features.keys():
                    ids = features[key].values().reshape(-1)
                    seen.setdefault(table_param(table_module, key), []).append(ids)

            child = getattr(module.module, table_module)
            hooks.append(child.register_forward_pre_hook(record))
        touched: dict[str, torch.Tensor] = {}
        try:
            yield touched
        finally:
            for hook in hooks:
                hook.remove()
        names = sorted(seen)
        local = [torch.cat(seen[n]).unique().to(torch.int64).cpu() for n in names]
        everyone = _all_gather_1d(torch.cat(local), [len(t) for t in local], self.world_size)
        shards = self._shards(module)
        for i, name in enumerate(names):
            shard = shards.get(name)
            if shard is None:
                continue
            ids = torch.cat([rank_ids[i] for rank_ids in everyone]).unique()
            inside = (ids >= shard.offset) & (ids < shard.offset + shard.rows)
            touched[name] = ids[inside] - shard.offset

    # -- writing ---------------------------------------------------------------------

    def unshard(self, module: nn.Module, config: NetworkConfig, item_tokens) -> nn.Module | None:
        """The whole network on rank 0 (``None`` elsewhere): every rank must call.

        Table shards are gathered to rank 0 only; no rank holds another's rows
        otherwise.
        """
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        state = {}
        for name, tensor in module.state_dict().items():
            if isinstance(tensor, ShardedTensor):
                out = torch.empty(tensor.size()) if self.is_writer else None
                tensor.gather(0, out)
                state[name] = out
            else:
                state[name] = tensor.detach().cpu()
        if not self.is_writer:
            return None
        network = RecNetwork(config, item_tokens)
        network.load_state_dict(state)
        return network

    def gather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's ``array``, concatenated in rank order, on every rank."""
        return np.concatenate(self.gather_objects(array))

    def gather_objects(self, value) -> list:
        """Every rank's picklable ``value``, in rank order, on every rank."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def mean_count(self, count: torch.Tensor) -> torch.Tensor:
        """The mean of ``count`` over the ranks: dividing each rank's sum by it
        makes the ranks' averaged gradients those of the global batch."""
        total = count.detach().to(torch.float32).clone()
        dist.all_reduce(total)
        return total / self.world_size

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def optimizer_state(self, module: nn.Module, optimizer) -> dict:
        """TorchRec's keyed state: fused table moments as sharded tensors."""
        dense = optimizer._optims[-1][1]  # the Adam of optimizer()
        if not dense.state:
            # A fresh optimizer has no moments to load a checkpoint into: one
            # zero-gradient step makes them (and moves nothing).
            optimizer.init_state()
        return optimizer.state_dict()

    def load_optimizer_state(self, module: nn.Module, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@torch.no_grad()
def _load_local_shards(module: nn.Module, whole: dict[str, torch.Tensor]) -> None:
    """Copies each table shard this rank holds from the whole tables."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, ShardedTensor):
            continue
        for shard in tensor.local_shards():
            (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(whole[name][row : row + rows, col : col + cols])


def _all_gather_1d(values: torch.Tensor, sizes: list[int], world: int) -> list[list[torch.Tensor]]:
    """All ranks' pieces: ``values`` is this rank's pieces of ``sizes``, concatenated."""
    counts = torch.tensor(sizes, dtype=torch.int64)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    longest = max(int(c.sum()) for c in all_counts)
    padded = torch.zeros(longest, dtype=torch.int64)
    padded[: len(values)] = values
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [
        list(torch.split(flat[: int(c.sum())], c.tolist()))
        for flat, c in zip(gathered, all_counts, strict=True)
    ]


def plan_network(
    network: nn.Module,
    world_size: int,
    sharding: str,
    sharders,
    device_type: str,
    hbm_cap: int | None = None,
):
    """TorchRec's planner on one network: every table sharded ``sharding``
    (``auto``: the planner's choice), fused.

    Collective under a process group (rank 0 plans and broadcasts the plan);
    without one, a plan on paper for ``world_size`` ranks.
    """
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )

    tables = [
        config.name
        for module in TABLE_MODULES
        for config in getattr(network, module).embedding_bag_configs()
    ]
    types = None if sharding == "auto" else [sharding]
    constraints = {
        t: ParameterConstraints(sharding_types=types, compute_kernels=["fused"])
        for t in tables
    }
    memory = {} if hbm_cap is None else {"hbm_cap": hbm_cap}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device_type, **memory),
        constraints=constraints,
    )
    if dist.is_initialized():
        return planner.collective_plan(network, sharders, dist.group.WORLD)
    return planner.plan(network, sharders)


def init_process_group() -> str | None:
    """Joins the ``torchrun`` process group, or makes a one-rank one.

    gloo on CPU; NCCL, with this rank's GPU, where CUDA is present. A one-rank
    group (``--nproc 1`` outside ``torchrun``) listens on 127.0.0.1 only.

    Returns:
        This rank's CUDA device, or None on CPU.
    """
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    device = None
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
