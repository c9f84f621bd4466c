"""The recommender network shared by the teacher and the cold-start student.

Embeddings are TorchRec ``EmbeddingBagCollection`` tables: one for user id (the
teacher only), one per user side feature, one for item id and one per item
feature. A user tower turns the user's inputs and the mean of their history into
a user embedding. With ``history_feedback``, each history item's vector also
carries the user's answer to it (a learned vector per answer, zero where not
known): whether they clicked it, or with ``feedback_ratings`` the 1-5 rating
where one is known. The candidate item attends over the history (DIN-style), giving
attention weights and an interest vector, and a two-output head scores the pair:

- ``like``: will the user click (rate 4 or 5) the item if it is shown to them;
  trained on logged interactions only, it is the click probability;
- ``interact``: would the user pick the item at all; trained on logged
  interactions against sampled unseen items (drawn by popularity, see
  ``NetworkConfig.negative_popularity``: popular items the user passed over
  teach more than obscure ones, and ranking corrects for the draw).

Ranking uses ``log P(interact) + log P(like)``: one logit alone is either good
at ranking (interactions) or at predicting clicks on shown items (likes), not
both.

The student is the same network without the user-id table: all it knows of a
user is their side features, the few items they touched and, when the request
says so, which of those they clicked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from data.examples import (
    CLICK_OF_CODE,
    FEEDBACK_CODES,
    FEEDBACK_CODES_WITH_RATINGS,
    FEEDBACK_UNKNOWN,
)
from data.features import FeatureSpace

USER_ID = "user_id"
ITEM_ID = "item_id"


@dataclass
class Batch:
    """Model inputs as tensors; see ``data.examples.Examples`` for the fields."""

    user_idx: torch.Tensor  # [B]
    user_feats: torch.Tensor  # [B, F]
    item_idx: torch.Tensor  # [B], or [B, N] items per row (see RecNetwork.forward)
    history: torch.Tensor  # [B, L]
    history_len: torch.Tensor  # [B]
    label: torch.Tensor | None = None  # [B]
    rated: torch.Tensor | None = None  # [B], 1 for logged interactions
    history_feedback: torch.Tensor | None = None  # [B, L]; None: all unknown

    @classmethod
    def from_examples(cls, examples) -> "Batch":
        return cls(
            user_idx=torch.from_numpy(examples.user_idx),
            user_feats=torch.from_numpy(examples.user_feats),
            item_idx=torch.from_numpy(examples.item_idx),
            history=torch.from_numpy(examples.history),
            history_len=torch.from_numpy(examples.history_len),
            label=torch.from_numpy(examples.label),
            rated=torch.from_numpy(examples.rated),
            history_feedback=torch.from_numpy(examples.history_feedback),
        )


@dataclass
class Output:
    logit: torch.Tensor  # [B] (or [B, N]), click logit of a shown item (like head)
    interact_logit: torch.Tensor  # [B] (or [B, N])
    user_embedding: torch.Tensor  # [B, D]
    attention: torch.Tensor  # [B, L] (or [B, N, L]), zero past the history length

    def rank_score(self) -> torch.Tensor:
        """Ranking scores (see :func:`rank_score`), shaped like ``logit``."""
        return rank_score(torch.stack([self.logit, self.interact_logit], -1))


def _in_order(pooled, keys: list[str]) -> torch.Tensor:
    """A ``KeyedTensor``'s values with the features in ``keys`` order.

    A sharded collection returns its features grouped by the rank holding
    them, not in the order the tables were declared.
    """
    if list(pooled.keys()) == list(keys):
        return pooled.values()
    values = pooled.to_dict()
    return torch.cat([values[k] for k in keys], 1)


@dataclass(frozen=True)
class CandidateCache:
    """The item-only part of scoring a fixed candidate set, computed once.

    Attributes:
        candidates: the item indices, ``[N]``.
        items: their item vectors, ``[N, D]``.
        queries: their attention queries, ``query(items)``, ``[N, D]``.
    """

    candidates: torch.Tensor
    items: torch.Tensor
    queries: torch.Tensor


@dataclass(frozen=True)
class EncodedUsers:
    """The user-side part of scoring, computed once for a set of users.

    Attributes:
        user: user embeddings, ``[B, D]``.
        history: history item vectors, zero past each length, ``[B, L, D]``.
        mask: which history entries are real, ``[B, L]``.
    """

    user: torch.Tensor
    history: torch.Tensor
    mask: torch.Tensor

    def rows(self, index: slice) -> "EncodedUsers":
        """The users in ``index`` (a slice keeps the batch dimension)."""
        return EncodedUsers(self.user[index], self.history[index], self.mask[index])


def rank_score(logits: torch.Tensor) -> torch.Tensor:
    """``log P(interact) + log P(like)`` from ``[..., 2]`` (like, interact) logits."""
    return F.logsigmoid(logits).sum(-1)


@dataclass(frozen=True)
class NetworkConfig:
    num_users: int
    num_items: int
    user_vocab_sizes: tuple[int, ...]
    item_vocab_sizes: tuple[int, ...]
    user_feature_names: tuple[str, ...]
    item_feature_names: tuple[str, ...]
    embedding_dim: int = 32
    hidden_dim: int = 64
    use_user_id: bool = True
    history_feedback: bool = False
    # A vector per 1-5 rating beside the click ones; without, a rating reads
    # as the click it implies (networks saved before ratings load so).
    feedback_ratings: bool = False
    # The interaction logit starts from log(1 + the item's train
    # interactions) (buffer ``item_log_count``, filled by the trainer): the
    # network learns how a user departs from popularity, not popularity too.
    popularity_offset: bool = False
    # Negatives were drawn in proportion to (train interactions + 1) to this
    # power: the interaction logit learned against them is the user's odds
    # over that draw, and ranking adds back the log of each item's draw
    # probability over a uniform draw (buffer ``negative_log_ratio``, filled
    # by the trainer). 0: uniform negatives, nothing added.
    negative_popularity: float = 0.0

    @classmethod
    def from_space(cls, space: FeatureSpace, use_user_id: bool, **dims) -> "NetworkConfig":
        return cls(
            num_users=len(space.user_ids) + 1,
            num_items=space.num_items,
            user_vocab_sizes=tuple(len(v) + 1 for v in space.user_vocab.values()),
            item_vocab_sizes=tuple(len(v) + 1 for v in space.item_vocab.values()),
            user_feature_names=tuple(space.user_vocab),
            item_feature_names=tuple(space.item_vocab),
            use_user_id=use_user_id,
            **dims,
        )


def _table(name: str, rows: int, dim: int, pooling: PoolingType) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=f"t_{name}",
        embedding_dim=dim,
        num_embeddings=rows,
        feature_names=[name],
        pooling=pooling,
    )


def _layers(sizes: list[int]) -> list[nn.Module]:
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


def _mlp(sizes: list[int]) -> nn.Sequential:
    return nn.Sequential(*_layers(sizes))


def head_segments(user, items, interest) -> list[torch.Tensor]:
    """The head's five inputs, in order; ``user`` ``[B, D]`` is broadcast over
    the ``N`` candidates of ``items`` and ``interest`` ``[B, N, D]``."""
    user_n = user[:, None, :]
    return [user_n, items, interest, user_n * items, interest * items]


class PairHead(nn.Sequential):
    """The click head: an MLP over ``[user, item, interest, user * item,
    interest * item]``, ``[B, N, 5 * D] -> [B, N, 2]``.

    Called with the parts (user ``[B, D]``, items and interest ``[B, N, D]``)
    rather than their concatenation, so that a quantized head can build its
    input itself (see ``models.quantize.Int8PairHead``).

    Without autograd the input is written part by part into one buffer, the
    products straight into their columns: ``torch.cat`` of the broadcast
    parts took about 10% longer in scoring 64 users against the catalogue.
    """

    def __init__(self, sizes: list[int]):
        super().__init__(*_layers(sizes))

    def forward(self, user, items, interest):
        if torch.is_grad_enabled():
            segments = head_segments(user, items, interest)
            segments[0] = segments[0].expand_as(items)
            return super().forward(torch.cat(segments, -1))
        d = items.shape[-1]
        features = items.new_empty(*items.shape[:-1], 5 * d)
        user_n, item_part, interest_part, user_item, interest_item = features.split(d, -1)
        user_n.copy_(user[:, None, :])
        item_part.copy_(items)
        interest_part.copy_(interest)
        torch.mul(user[:, None, :], items, out=user_item)
        torch.mul(interest, items, out=interest_item)
        return super().forward(features)


class RecNetwork(nn.Module):
    """User tower, candidate attention over history, and click head.

    Args:
        config: table sizes and widths.
        item_tokens: per item feature, per item index, the token indices
            (the item's genres, say); row 0, the padding item, has none.
    """

    def __init__(self, config: NetworkConfig, item_tokens: dict[str, list[list[int]]]):
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.user_keys = ([USER_ID] if config.use_user_id else []) + list(
            config.user_feature_names
        )
        user_rows = ([config.num_users] if config.use_user_id else []) + list(
            config.user_vocab_sizes
        )
        self.user_tables = EmbeddingBagCollection(
            tables=[_table(k, n, d, PoolingType.SUM) for k, n in zip(self.user_keys, user_rows)]
        )
        self.item_keys = [ITEM_ID, *config.item_feature_names]
        item_rows = [config.num_items, *config.item_vocab_sizes]
        self.item_tables = EmbeddingBagCollection(
            tables=[
                _table(k, n, d, PoolingType.SUM if k == ITEM_ID else PoolingType.MEAN)
                for k, n in zip(self.item_keys, item_rows)
            ]
        )
        self._register_item_tokens(item_tokens)

        self.item_proj = nn.Linear(len(self.item_keys) * d, d)
        self.user_tower = _mlp([(len(self.user_keys) + 1) * d, config.hidden_dim, d])
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.head = PairHead([5 * d, config.hidden_dim, config.hidden_dim // 2, 2])
        if config.popularity_offset:
            self.register_buffer("item_log_count", torch.zeros(config.num_items))
        if config.negative_popularity:
            self.register_buffer("negative_log_ratio", torch.zeros(config.num_items))
        if config.history_feedback:
            # Added to each history item's vector: the user's answer to it.
            # Three codes (eight with ratings), a dense parameter rather than
            # an embedding table.
            # Zeros at first, so the network starts as one without it (and
            # draws nothing from the random generator).
            codes = FEEDBACK_CODES
            if config.feedback_ratings:
                codes = FEEDBACK_CODES_WITH_RATINGS
            self.feedback = nn.Embedding(
                codes, d, padding_idx=FEEDBACK_UNKNOWN, _weight=torch.zeros(codes, d)
            )
            if not config.feedback_ratings:
                # Reads each rating code as the click it implies.
                self.register_buffer(
                    "click_of_code", torch.from_numpy(CLICK_OF_CODE), persistent=False
                )

    def _register_item_tokens(self, item_tokens: dict[str, list[list[int]]]) -> None:
        # CSR layout per feature: token values and per-item offsets, padding first.
        for name in self.config.item_feature_names:
            rows = [[]] + item_tokens[name]
            lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
            values = torch.tensor([t for r in rows for t in r], dtype=torch.int64)
            offsets = torch.cumsum(lengths, 0) - lengths
            self.register_buffer(f"{name}_values", values, persistent=False)
            self.register_buffer(f"{name}_lengths", lengths, persistent=False)
            self.register_buffer(f"{name}_offsets", offsets, persistent=False)

    def item_vectors(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Item embeddings for any shape of indices: ``[...] -> [..., D]``."""
        flat = item_idx.reshape(-1)
        values, lengths = [flat], [torch.ones_like(flat)]
        for name in self.config.item_feature_names:
            feature_lengths = getattr(self, f"{name}_lengths")[flat]
            starts = getattr(self, f"{name}_offsets")[flat]
            # Position of each token within its item's run, then its global index.
            run_start = torch.repeat_interleave(
                torch.cumsum(feature_lengths, 0) - feature_lengths, feature_lengths
            )
            within = torch.arange(int(feature_lengths.sum())) - run_start
            index = torch.repeat_interleave(starts, feature_lengths) + within
            values.append(getattr(self, f"{name}_values")[index])
            lengths.append(feature_lengths)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.item_keys, values=torch.cat(values), lengths=torch.cat(lengths)
        )
        pooled = _in_order(self.item_tables(kjt), self.item_keys)  # [M, K * D]
        return self.item_proj(pooled).reshape(*item_idx.shape, -1)

    def user_inputs(self, user_idx: torch.Tensor, user_feats: torch.Tensor) -> torch.Tensor:
        """Pooled user-side embeddings, ``[B, K * D]``; ``K`` is 0 for a
        network without the user id (the student) on a log without user
        features: it reads the history alone."""
        columns = ([user_idx] if self.config.use_user_id else []) + list(
            user_feats.unbind(1)
        )
        if not columns:
            return torch.zeros(len(user_idx), 0)
        values = torch.cat(columns)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.user_keys, values=values, lengths=torch.ones_like(values)
        )
        return _in_order(self.user_tables(kjt), self.user_keys)

    def encode_user(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the user embedding ``[B, D]``, history vectors ``[B, L, D]`` and
        the history mask ``[B, L]``."""
        length = batch.history.shape[1]
        mask = torch.arange(length)[None, :] < batch.history_len[:, None]
        history = self.item_vectors(batch.history)
        if self.config.history_feedback and batch.history_feedback is not None:
            codes = batch.history_feedback
            if not self.config.feedback_ratings:
                codes = self.click_of_code[codes]
            history = history + self.feedback(codes)
        history = history * mask[..., None]
        mean = history.sum(1) / batch.history_len.clamp(min=1)[:, None]
        tower_in = torch.cat([self.user_inputs(batch.user_idx, batch.user_feats), mean], 1)
        return self.user_tower(tower_in), history, mask

    def forward(self, batch: Batch) -> Output:
        """Scores each row's item, or with ``item_idx`` ``[B, N]`` each row's
        ``N`` items: the logits are then ``[B, N]`` and the attention
        ``[B, N, L]``. Training a ranking term goes through here rather than
        :meth:`score_candidates`, so that a wrapped (DDP) network syncs it."""
        user, history, mask = self.encode_user(batch)
        listed = batch.item_idx.dim() == 2
        items = self.item_vectors(batch.item_idx)  # [B, D] or [B, N, D]
        item_idx = batch.item_idx if listed else batch.item_idx[:, None]
        logits, attention = self._score(
            user,
            history,
            mask,
            items if listed else items[:, None, :],
            offset=self._offset(item_idx),
        )
        if listed:
            return Output(logits[..., 0], logits[..., 1], user, attention)
        return Output(logits[:, 0, 0], logits[:, 0, 1], user, attention[:, 0])

    def score_candidates(self, batch: Batch, candidates: torch.Tensor) -> torch.Tensor:
        """Ranking scores (see ``rank_score``) of each user against every
        candidate, ``[B, N]``.

        ``batch.item_idx`` is ignored; ``candidates`` is ``[N]`` item indices.
        The candidates' attention queries are computed once, not once per user.
        """
        return self.score_encoded(self.encode_users(batch), self.candidate_cache(candidates))

    def encode_users(self, batch: Batch) -> EncodedUsers:
        """:meth:`encode_user` as one object, to keep and reuse."""
        return EncodedUsers(*self.encode_user(batch))

    def candidate_cache(self, candidates: torch.Tensor) -> CandidateCache:
        """The item-only work of :meth:`score_candidates`, to do once.

        The candidates go through the item layers as one batch, as they do in
        :meth:`score_candidates`, so dynamically quantized layers (whose
        activation scale depends on the batch) give the same vectors.

        Args:
            candidates: item indices, ``[N]``.

        Returns:
            Their item vectors and attention queries.
        """
        items = self.item_vectors(candidates)  # [N, D]
        return CandidateCache(candidates, items, self.query(items[None])[0])

    def score_encoded(self, users: EncodedUsers, cache: CandidateCache) -> torch.Tensor:
        """:meth:`score_candidates` from encoded users and cached candidates.

        Args:
            users: from :meth:`encode_users`, ``B`` users.
            cache: from :meth:`candidate_cache`.

        Returns:
            Ranking scores, ``[B, N]``.
        """
        size = users.user.shape[0]
        items = cache.items[None].expand(size, -1, -1)  # [B, N, D]
        queries = cache.queries[None].expand(size, -1, -1)  # [B, N, D]
        offset = self._offset(cache.candidates[None])
        if self.config.negative_popularity:
            ratio = self.negative_log_ratio[cache.candidates][None]
            offset = ratio if offset is None else offset + ratio
        logits, _ = self._score(
            users.user, users.history, users.mask, items, queries, offset
        )
        return rank_score(logits)

    def _offset(self, item_idx: torch.Tensor) -> torch.Tensor | None:
        """The interaction logit's popularity offset of ``item_idx``, or None."""
        if not self.config.popularity_offset:
            return None
        return self.item_log_count[item_idx]

    def _score(self, user, history, mask, items, queries=None, offset=None):
        """user [B, D], history [B, L, D], mask [B, L], items [B, N, D];
        queries [B, N, D] is ``query(items)``, computed here when ``None``;
        offset [B or 1, N] is added to the interaction logit."""
        d = self.config.embedding_dim
        queries = self.query(items) if queries is None else queries
        scores = torch.einsum("bnd,bld->bnl", queries, self.key(history))
        scores = scores / math.sqrt(d)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        # A user with no history attends to nothing: weights stay zero, not NaN.
        attention = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)  # [B, N, L]
        interest = torch.einsum("bnl,bld->bnd", attention, history)
        logits = self.head(user, items, interest)  # [B, N, 2]: like, interact
        user_n = user[:, None, :].expand_as(items)
        # The dot product keeps user and item embeddings in one retrieval space.
        dot = (user_n * items).sum(-1)
        interact = logits[..., 1] + dot
        if offset is not None:
            interact = interact + offset
        logits = torch.stack([logits[..., 0], interact], -1)
        return logits, attention  # [B, N, 2], [B, N, L]
