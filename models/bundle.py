"""The served model: EMA teacher for known users, INT8 student for new ones.

A bundle is the directory the pipeline exports and registers in MLflow. Loading
it gives everything serving needs: the catalogue, known users' histories and
side features, the EMA teacher and the INT8 cold-start student.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from data.examples import FEEDBACK_UNKNOWN, feedback_codes
from data.features import FeatureSpace
from data.schema import CLICK_THRESHOLD
from models.network import Batch, EncodedUsers
from models.store import load_network

# Known users are encoded at load in chunks of this many, to bound the memory
# of the intermediate tensors.
ENCODE_CHUNK = 256


@dataclass(frozen=True)
class ColdUser:
    """A user the model has no id embedding for.

    Attributes:
        features: side features by name, e.g. ``{"gender": "F", "age": "25"}``;
            unknown names and values are rejected by serving (see
            ``Predictor.user_feature_problem``), missing ones fall back to
            "unknown".
        item_ids: the few items the user has touched, oldest first.
        clicked: whether the user clicked each of ``item_ids``, in the same
            order; None when not known.
        ratings: the user's 1-5 rating of each of ``item_ids``, in the same
            order; None when not known. A rating says more than a click: with
            both, the ratings are read.
    """

    features: dict[str, str]
    item_ids: tuple[int, ...]
    clicked: tuple[bool, ...] | None = None
    ratings: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("clicked", "ratings"):
            answers = getattr(self, name)
            if answers is not None and len(answers) != len(self.item_ids):
                raise ValueError(
                    f"{name} holds {len(answers)} values for "
                    f"{len(self.item_ids)} item_ids; give one per item or none"
                )
        if self.ratings is not None and not all(1 <= r <= 5 for r in self.ratings):
            raise ValueError(f"ratings must be from 1 to 5, got {list(self.ratings)}")


@dataclass(frozen=True)
class Scored:
    """A recommended item; ``score`` is the probability that the user picks the
    item and likes it (``P(interact) * P(like)``)."""

    item_id: int
    score: float


class Predictor(Protocol):
    """What serving needs from a model; ``ModelBundle`` is the real one.

    ``user_embeddings`` of known users must be a memory read, not a network
    call: serving calls it on the event loop.
    """

    version: str
    embedding_dim: int
    user_feature_names: tuple[str, ...]

    def has_user(self, user_id: int) -> bool: ...

    def has_item(self, item_id: int) -> bool: ...

    def user_feature_problem(self, name: str, value: str) -> str | None:
        """Why a new user's value of feature ``name`` would be read as
        unknown (with the known values and the fix), or None if it is known."""
        ...

    def item_title(self, item_id: int) -> str | None: ...

    def seen_items(self, user_id: int) -> frozenset[int]: ...

    def user_embeddings(self, user_ids: Sequence[int]) -> np.ndarray: ...

    def cold_embeddings(self, users: Sequence[ColdUser]) -> np.ndarray: ...

    def recommend_known(self, user_id: int, k: int) -> list[Scored]: ...

    def recommend_cold(self, user: ColdUser, k: int) -> list[Scored]: ...


BUNDLE_FORMAT = 1


class ModelBundle:
    """The real predictor, loaded from an exported bundle directory.

    Known users are served by the EMA teacher with the history the bundle
    holds for them; new users by the INT8 student from what the request says.
    Inference is read-only, so one bundle serves concurrent threads.

    Everything that does not depend on the request is computed once, when the
    bundle is loaded (so before a new version is swapped in): the known users'
    teacher encodings (embedding, history vectors and mask) and, per network,
    the candidate items' vectors and attention queries. A known user's
    embedding is then a row lookup, and a recommendation only runs the
    attention and the head. The caches take about
    ``users * (max_history + 1) * embedding_dim`` floats.
    """

    def __init__(self, path: Path, version: str = "local"):
        path = Path(path)
        meta_path = path / "bundle.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not an emarec bundle: bundle.json is missing")
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError as error:
            raise ValueError(
                f"{meta_path} is not JSON ({error}): export the bundle again"
            ) from None
        if not isinstance(self.meta, dict) or "max_history" not in self.meta:
            raise ValueError(
                f"{meta_path} holds no bundle description (format, max_history): "
                "export the bundle again"
            )
        if self.meta.get("format") != BUNDLE_FORMAT:
            raise ValueError(
                f"{meta_path}: bundle format {self.meta.get('format')} is not "
                f"{BUNDLE_FORMAT}; re-export it with this version of emarec"
            )
        self.version = version
        self.path = path
        self.space = FeatureSpace.load(path / "space.json")
        self.max_history = int(self.meta["max_history"])
        self.teacher = load_network(path, "ema_teacher", self.space)
        self.student = load_network(path, "student_int8", self.space)
        self.embedding_dim = int(self.teacher.config.embedding_dim)
        self.user_feature_names = tuple(self.space.user_features)
        self._candidates = torch.arange(self.space.num_items)
        self._load_tables(path)
        self._build_caches()

    def _load_tables(self, path: Path) -> None:
        users = pd.read_parquet(path / "users.parquet")
        self._users = {
            int(row["user_id"]): row for row in users.to_dict("records")
        }
        items = pd.read_parquet(path / "items.parquet")
        self._titles = dict(zip(items.item_id.astype(int), items.title.astype(str)))
        self._item_ids = np.array([0, *self.space.item_ids], dtype=np.int64)

    @torch.no_grad()
    def _build_caches(self) -> None:
        """Everything requests reuse: candidate items per network, known users'
        teacher encodings and embeddings, and their seen items' indices."""
        self._teacher_items = self.teacher.candidate_cache(self._candidates)
        self._student_items = self.student.candidate_cache(self._candidates)
        user_ids = list(self._users)
        self._user_row = {user_id: row for row, user_id in enumerate(user_ids)}
        self._known = self._encode_known(user_ids)
        self._known_embeddings = self._known.user.numpy().astype(np.float32)
        self._seen_index = {
            user_id: self._item_index(self.seen_items(user_id)) for user_id in user_ids
        }

    def _encode_known(self, user_ids: list[int]) -> EncodedUsers:
        """Teacher encodings of known users, ``[U, ...]`` in ``user_ids`` order."""
        starts = range(0, len(user_ids), ENCODE_CHUNK)
        chunks = [user_ids[i : i + ENCODE_CHUNK] for i in starts]
        parts = [self.teacher.encode_users(self._known_batch(c)) for c in chunks]
        if not parts:
            d, width = self.embedding_dim, self.max_history
            empty = torch.zeros(0, width, dtype=torch.bool)
            return EncodedUsers(torch.zeros(0, d), torch.zeros(0, width, d), empty)
        return EncodedUsers(
            torch.cat([p.user for p in parts]),
            torch.cat([p.history for p in parts]),
            torch.cat([p.mask for p in parts]),
        )

    def has_user(self, user_id: int) -> bool:
        return int(user_id) in self._users

    def has_item(self, item_id: int) -> bool:
        return self.space.has_item(item_id)

    def user_feature_problem(self, name: str, value: str) -> str | None:
        return self.space.user_value_problem(name, value)

    def item_title(self, item_id: int) -> str | None:
        return self._titles.get(int(item_id))

    def seen_items(self, user_id: int) -> frozenset[int]:
        return frozenset(int(i) for i in self._users[int(user_id)]["seen"])

    def _known_batch(self, user_ids: Sequence[int]) -> Batch:
        rows = [self._users[int(u)] for u in user_ids]
        return self._batch(
            self.space.user_index(user_ids),
            [self.space.encode_user(row) for row in rows],
            [list(row["history"]) for row in rows],
            # Bundles exported before feedback was kept have neither column.
            [row.get("history_clicked") for row in rows],
            [row.get("history_rating") for row in rows],
        )

    def _cold_batch(self, users: Sequence[ColdUser]) -> Batch:
        return self._batch(
            np.zeros(len(users), np.int64),
            [self.space.encode_user(u.features) for u in users],
            [list(u.item_ids) for u in users],
            [u.clicked for u in users],
            [u.ratings for u in users],
        )

    def _batch(self, user_idx, tokens, histories, clicks, ratings) -> Batch:
        """Clicks and ratings are per history, None where not known; a
        rating that is NaN reads as its event's click."""
        width = self.max_history
        history = np.zeros((len(histories), width), np.int64)
        feedback = np.full((len(histories), width), FEEDBACK_UNKNOWN, np.int64)
        lengths = np.zeros(len(histories), np.int64)
        rows = zip(histories, clicks, ratings, strict=True)
        for row, (items, clicked, rated) in enumerate(rows):
            index = self.space.item_index(items[-width:])
            history[row, : len(index)] = index
            lengths[row] = len(index)
            if rated is not None:
                rated = np.asarray(list(rated)[-width:], np.float64)
                implied = rated >= CLICK_THRESHOLD if clicked is None else clicked
                codes = feedback_codes(list(implied)[-width:], rated)
                feedback[row, : len(index)] = codes
            elif clicked is not None:
                feedback[row, : len(index)] = feedback_codes(list(clicked)[-width:])
        return Batch(
            user_idx=torch.as_tensor(user_idx, dtype=torch.int64),
            user_feats=torch.tensor(tokens, dtype=torch.int64).reshape(len(histories), -1),
            item_idx=torch.zeros(len(histories), dtype=torch.int64),
            history=torch.from_numpy(history),
            history_len=torch.from_numpy(lengths),
            history_feedback=torch.from_numpy(feedback),
        )

    def user_embeddings(self, user_ids: Sequence[int]) -> np.ndarray:
        """Known users' EMA-teacher embeddings, ``[B, D]``, from the load-time cache.

        Raises:
            KeyError: a user is not known.
        """
        rows = [self._user_row[int(u)] for u in user_ids]
        return self._known_embeddings[rows]

    @torch.no_grad()
    def compute_user_embeddings(self, user_ids: Sequence[int]) -> np.ndarray:
        """:meth:`user_embeddings` through the teacher network, bypassing the cache."""
        user, _, _ = self.teacher.encode_user(self._known_batch(user_ids))
        return user.numpy().astype(np.float32)

    @torch.no_grad()
    def cold_embeddings(self, users: Sequence[ColdUser]) -> np.ndarray:
        user, _, _ = self.student.encode_user(self._cold_batch(users))
        return user.numpy().astype(np.float32)

    @torch.no_grad()
    def recommend_known(self, user_id: int, k: int) -> list[Scored]:
        """Top ``k`` unseen items for a known user, from the cached encodings."""
        row = self._user_row[int(user_id)]
        users = self._known.rows(slice(row, row + 1))
        score = self.teacher.score_encoded(users, self._teacher_items)[0]
        return self._top(score, self._seen_index[int(user_id)], k)

    @torch.no_grad()
    def recommend_cold(self, user: ColdUser, k: int) -> list[Scored]:
        """Top ``k`` items a new user has not touched, from the cached items."""
        users = self.student.encode_users(self._cold_batch([user]))
        score = self.student.score_encoded(users, self._student_items)[0]
        return self._top(score, self._item_index(user.item_ids), k)

    @torch.no_grad()
    def compute_recommend_known(self, user_id: int, k: int) -> list[Scored]:
        """:meth:`recommend_known` through the whole network, bypassing the caches."""
        batch = self._known_batch([user_id])
        score = self.teacher.score_candidates(batch, self._candidates)[0]
        return self._top(score, self._item_index(self.seen_items(user_id)), k)

    @torch.no_grad()
    def compute_recommend_cold(self, user: ColdUser, k: int) -> list[Scored]:
        """:meth:`recommend_cold` through the whole network, bypassing the caches."""
        batch = self._cold_batch([user])
        score = self.student.score_candidates(batch, self._candidates)[0]
        return self._top(score, self._item_index(user.item_ids), k)

    def _item_index(self, item_ids) -> torch.Tensor:
        """Item indices of distinct item ids, ``[M]``."""
        return torch.from_numpy(self.space.item_index(list(set(item_ids))))

    def _top(self, score: torch.Tensor, excluded: torch.Tensor, k: int) -> list[Scored]:
        """Best ``k`` of ``score`` (log P(interact) + log P(like), ``[num_items]``),
        leaving out the padding item and the ``excluded`` item indices."""
        score[0] = -torch.inf
        score[excluded] = -torch.inf
        k = min(k, int(torch.isfinite(score).sum()))
        values, index = torch.topk(score, k)
        probability = torch.exp(values)
        return [
            Scored(int(self._item_ids[i]), float(p)) for i, p in zip(index, probability)
        ]


def load_bundle(path: Path, version: str = "local") -> ModelBundle:
    """Loads an exported bundle directory.

    Raises:
        FileNotFoundError: the directory is not a bundle.
        ValueError: the bundle was written by an incompatible version.
    """
    return ModelBundle(path, version)
