"""Everything the train and evaluate steps derive from the ingested data, built the
same way in both so that a step run alone sees the same examples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data.examples import Examples, RankingUser, build_examples, ranking_users
from data.features import FeatureSpace
from data.split import holdout_events, is_cold, split_interactions
from pipeline.ingest import interactions_path, read_ingested


@dataclass
class Prepared:
    events: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    space: FeatureSpace
    user_tokens: dict[int, list[int]]
    examples: Examples

    def select(self, cohort: str, split: str) -> Examples:
        mask = (self.events.cohort == cohort) & (self.events.split == split)
        return self.examples.take(np.flatnonzero(mask.to_numpy()))

    def seen_in_train(self) -> dict[int, set[int]]:
        """Item indices each user has in train or onboarding."""
        known = self.events.split.isin(["train", "onboarding"]).to_numpy()
        frame = pd.DataFrame(
            {"user_id": self.examples.user_id[known], "item": self.examples.item_idx[known]}
        )
        return {int(u): set(g) for u, g in frame.groupby("user_id")["item"]}

    def ranking_users(self) -> list[RankingUser]:
        return ranking_users(self.events, self.examples)


def data_shard(user_id, shards: int):
    """The data shard of a user: ``user_id % shards``."""
    return user_id % shards


def owned_shards(rank: int, world_size: int, shards: int) -> list[int]:
    """The data shards rank ``rank`` of ``world_size`` reads: every
    ``world_size``-th from ``rank``. Each shard draws its own negatives and
    order and fills a fixed share of every global batch, so the batches do not
    depend on how many processes share the shards.

    Raises:
        ValueError: if ``world_size`` does not divide ``shards``.
    """
    if shards % world_size:
        raise ValueError(
            f"{world_size} processes cannot share {shards} data shards evenly: set "
            f"train.data_shards to a multiple of {world_size}"
        )
    return list(range(rank, shards, world_size))


def ranks_without_training_rows(
    work_dir: Path, world_size: int, shards: int
) -> list[int]:
    """The ranks of a ``world_size``-process run whose data shards (see
    :func:`owned_shards`) hold no warm user with a training event, from the
    ingested user-id column alone."""
    column = pq.read_table(interactions_path(work_dir), columns=["user_id"])
    ids, counts = np.unique(column.column("user_id").to_numpy(), return_counts=True)
    trains = np.array([n - 2 * holdout_events(n) > 0 for n in counts], dtype=bool)
    trains &= ~is_cold(ids)
    fed = {int(s) % world_size for s in data_shard(ids[trains], shards)}
    return [rank for rank in range(world_size) if rank not in fed]


def prepare(
    work_dir: Path,
    max_history: int,
    space: FeatureSpace | None = None,
    shard: tuple[int, int, int] = (0, 1, 1),
) -> Prepared:
    """Splits the ingested events and encodes them.

    Args:
        space: vocabularies to reuse (a trained model's); built afresh if None.
        shard: ``(rank, world_size, data_shards)``: keep the users of the data
            shards this rank owns (see :func:`owned_shards`), reading only
            their interactions. The vocabularies still cover every user, from
            the interactions' user-id column.
    """
    rank, world, shards = shard
    part = None
    if world > 1:
        column = pq.read_table(interactions_path(work_dir), columns=["user_id"])
        ids = np.unique(column.column("user_id").to_numpy())  # sorted
        part = ids[np.isin(data_shard(ids, shards), owned_shards(rank, world, shards))]
        part = part.tolist()
    interactions, users, items, meta = read_ingested(work_dir, part)
    events = split_interactions(interactions)
    if space is None:
        if part is None:
            warm = events.loc[events.cohort == "warm", "user_id"].unique()
        else:
            warm = ids[~is_cold(ids)]
        space = FeatureSpace.build(
            users, items, meta["user_features"], meta["item_features"], warm.tolist()
        )
    user_tokens = space.encode_users(users)
    examples = build_examples(events, space, user_tokens, max_history)
    return Prepared(events, users, items, space, user_tokens, examples)
