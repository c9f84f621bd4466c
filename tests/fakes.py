"""Small deterministic stand-ins for the model bundle and the MLflow client."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from data.features import AGE_BUCKETS, FeatureSpace
from models.bundle import ColdUser, Scored
from serving.registry import ModelRef


class FakePredictor:
    """A ``Predictor`` over random but seeded user and item vectors.

    Users ``0..n_users-1`` are known and items ``0..n_items-1`` exist. User
    ``u`` has seen items ``u % n_items`` and ``(3u + 1) % n_items``. Item 0 has
    no title. New users' feature values are checked by a real ``FeatureSpace``
    whose vocabularies are ``FEATURE_VOCAB``.
    """

    embedding_dim = 8
    user_feature_names = ("gender", "age", "occupation")
    FEATURE_VOCAB = {
        "gender": ["F", "M"],
        "age": [label for _, label in AGE_BUCKETS] + ["50-55", "56+"],
        "occupation": ["artist", "engineer", "writer"],
    }
    SPACE = FeatureSpace(
        user_ids=[],
        item_ids=[],
        user_features={
            "gender": "categorical",
            "age": "age_bucket",
            "occupation": "categorical",
        },
        user_vocab=FEATURE_VOCAB,
        item_vocab={},
        item_tokens={},
    )

    def __init__(
        self, n_users: int = 20, n_items: int = 40, seed: int = 0, version: str = "7"
    ) -> None:
        self.version = version
        rng = np.random.default_rng(seed)
        self.n_users, self.n_items = n_users, n_items
        shape = (n_users, self.embedding_dim)
        self.users = rng.standard_normal(shape).astype(np.float32)
        self.items = rng.standard_normal((n_items, self.embedding_dim)).astype(
            np.float32
        )
        self.features = {
            name: rng.standard_normal(self.embedding_dim).astype(np.float32)
            for name in self.user_feature_names
        }
        self.cold_calls: list[ColdUser] = []

    def has_user(self, user_id: int) -> bool:
        return 0 <= user_id < self.n_users

    def has_item(self, item_id: int) -> bool:
        return 0 <= item_id < self.n_items

    def user_feature_problem(self, name: str, value: str) -> str | None:
        return self.SPACE.user_value_problem(name, value)

    def item_title(self, item_id: int) -> str | None:
        return f"Item {item_id}" if item_id else None

    def seen_items(self, user_id: int) -> frozenset[int]:
        return frozenset({user_id % self.n_items, (3 * user_id + 1) % self.n_items})

    def user_embeddings(self, user_ids: Sequence[int]) -> np.ndarray:
        return self.users[list(user_ids)]

    def cold_embeddings(self, users: Sequence[ColdUser]) -> np.ndarray:
        self.cold_calls.extend(users)
        return np.stack([self._cold(user) for user in users])

    def recommend_known(self, user_id: int, k: int) -> list[Scored]:
        return self._top(self.users[user_id], self.seen_items(user_id), k)

    def recommend_cold(self, user: ColdUser, k: int) -> list[Scored]:
        self.cold_calls.append(user)
        return self._top(self._cold(user), frozenset(user.item_ids), k)

    def _cold(self, user: ColdUser) -> np.ndarray:
        vector = self.items[list(user.item_ids)].mean(axis=0)
        for name in user.features:
            vector = vector + self.features[name]
        return vector.astype(np.float32)

    def _top(self, vector: np.ndarray, exclude: frozenset[int], k: int) -> list[Scored]:
        scores = self.items @ vector
        order = [int(i) for i in np.argsort(-scores, kind="stable") if i not in exclude]
        return [Scored(i, float(scores[i])) for i in order[:k]]


class BlockingPredictor(FakePredictor):
    """A ``FakePredictor`` whose warm recommendations wait for ``release``.

    ``entered`` is set once a request is inside the model, so a test can swap
    models while that request is in flight.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    def recommend_known(self, user_id: int, k: int) -> list[Scored]:
        self.entered.set()
        if not self.release.wait(10):
            raise TimeoutError("the test never released the blocked request")
        return super().recommend_known(user_id, k)


class FakeSource:
    """A registry stand-in: ``champion_version`` is the alias, movable at will.

    Versions ``"7"``, ``"8"`` and ``"9"`` exist, each a ``FakePredictor`` with
    its own seed; ``broken`` versions raise on load, ``down`` makes reading the
    alias raise. Every load is logged in ``loads``.
    """

    follows = True

    def __init__(self, predictors: dict[str, FakePredictor] | None = None) -> None:
        self.predictors = predictors or {
            v: FakePredictor(seed=int(v), version=v) for v in ("7", "8", "9")
        }
        self.champion_version = "7"
        self.broken: set[str] = set()
        self.down = False
        self.loads: list[str] = []

    def champion(self) -> ModelRef:
        if self.down:
            raise ConnectionError("registry unreachable")
        return ModelRef(self.champion_version, f"train-{self.champion_version}")

    def load(self, ref: ModelRef) -> FakePredictor:
        self.loads.append(ref.version)
        if ref.version in self.broken:
            raise RuntimeError(f"PytorchStreamReader failed reading v{ref.version}")
        return self.predictors[ref.version]


@dataclass
class FakeMlflowClient:
    """Records what a ``ServingReporter`` sends; ``fail`` makes every call raise."""

    fail: bool = False
    experiments: dict[str, str] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    batches: list[tuple[str, list]] = field(default_factory=list)
    terminated: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, dict[str, bytes]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def _check(self) -> None:
        if self.fail:
            raise ConnectionError("tracking server unreachable")

    def get_experiment_by_name(self, name: str):
        self._check()
        if name not in self.experiments:
            return None
        return SimpleNamespace(experiment_id=self.experiments[name])

    def create_experiment(self, name: str) -> str:
        self._check()
        self.experiments[name] = f"exp-{next(self._ids)}"
        return self.experiments[name]

    def create_run(self, experiment_id: str, tags=None, run_name=None):
        self._check()
        run_id = f"run-{next(self._ids)}"
        self.runs[run_id] = {"experiment_id": experiment_id, "tags": dict(tags or {})}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._check()
        self.batches.append((run_id, list(metrics)))

    def log_artifact(self, run_id: str, local_path: str, artifact_path=None) -> None:
        """Keep the file's bytes under ``artifacts[run_id]["<dir>/<name>"]``."""
        self._check()
        name = Path(local_path).name
        key = f"{artifact_path}/{name}" if artifact_path else name
        self.artifacts.setdefault(run_id, {})[key] = Path(local_path).read_bytes()

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self._check()
        self.terminated[run_id] = status

    def last_metrics(self) -> dict[str, float]:
        """Metric values of the last logged batch."""
        return {m.key: m.value for m in self.batches[-1][1]}


def reporter_factory(mlflow_client):
    """A ``create_app`` reporter factory whose reporters log to ``mlflow_client``."""
    from serving.reporter import ServingReporter

    def make(settings, version, run_id):
        return ServingReporter.from_settings(settings, version, run_id, mlflow_client)

    return make
