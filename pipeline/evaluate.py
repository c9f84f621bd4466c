"""Evaluate every model on the test sets of both cohorts.

Pointwise: AUC and log loss over the rated test pairs, from the networks'
click (like) head: a rated item is one the user was shown. Ranking: Recall@K and
NDCG@K over all items the user has not seen in train (warm) or onboarding
(cold), relevant = the user's test clicks. Recall@K is normalised by
``min(K, relevant)`` so that a perfect top-K scores 1 for users with many
relevant items. Popularity ranks items by train-and-onboarding clicks; its
probability for log loss is the item's smoothed click rate. Beside the models,
``test_click_popularity`` gives the Recall@K and NDCG@K of the best ranking
shared by all users, fitted on the test clicks: how far any popularity could
get, and so how much a model's personal part adds above it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import log_loss, roc_auc_score  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.examples import (  # noqa: E402
    FEEDBACK_UNKNOWN,
    Examples,
    RankingUser,
    clicks_only,
)
from models.network import Batch  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.lineage import (  # noqa: E402
    LINEAGE,
    read_json,
    read_quantized,
    rewrite_error,
    stale_int8,
    trained_stamp,
    write_lineage,
)
from pipeline.prepare import Prepared, prepare  # noqa: E402
from pipeline.tracking import tracked_run  # noqa: E402

logger = logging.getLogger(__name__)

MODELS = (
    "popularity", "online_teacher", "ema_teacher", "ema_teacher_adaptive", "student",
    "student_int8", "student_int8_clicks_only", "student_int8_items_only",
)  # fmt: skip
COHORTS = ("cold", "warm")
USERS_PER_CHUNK = 64
# Each ranked test user's Recall@K per model, beside metrics.json: what a
# paired comparison of two models over the same users reads.
USER_RECALL = "user_recall.csv"
# Ranking figures of :func:`shared_ranking_bound`: a bound, not a model.
SHARED_BOUND = "test_click_popularity"


class FeedbackView:
    """A network read as a request with less history feedback would have it:
    ``items_only`` hides all of it (what a new user who sends ``item_ids``
    alone gets), ``clicks_only`` reduces ratings to the clicks they imply
    (what one who sends ``clicked`` without ``ratings`` gets)."""

    def __init__(self, network, view: str) -> None:
        if view not in ("items_only", "clicks_only"):
            raise ValueError(f"view must be items_only or clicks_only, not {view!r}")
        self.network, self.view = network, view

    def _batch(self, batch: Batch) -> Batch:
        if self.view == "items_only" or batch.history_feedback is None:
            return replace(batch, history_feedback=None)
        codes = torch.from_numpy(clicks_only(batch.history_feedback.numpy()))
        return replace(batch, history_feedback=codes)

    def __call__(self, batch: Batch):
        return self.network(self._batch(batch))

    def score_candidates(self, batch: Batch, candidates: torch.Tensor) -> torch.Tensor:
        return self.network.score_candidates(self._batch(batch), candidates)


def with_feedback_views(models: dict) -> dict:
    """``models`` plus the INT8 student read with less feedback, where it reads
    feedback: ``student_int8_items_only``, and ``student_int8_clicks_only``
    when it reads ratings."""
    int8 = models.get("student_int8")
    if int8 is None or not int8.config.history_feedback:
        return models
    views = {"student_int8_items_only": FeedbackView(int8, "items_only")}
    if int8.config.feedback_ratings:
        views["student_int8_clicks_only"] = FeedbackView(int8, "clicks_only")
    return {**models, **views}


def eval_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "eval"


class Popularity:
    """Clicks per item in train and onboarding."""

    def __init__(self, prepared: Prepared):
        known = prepared.events.split.isin(["train", "onboarding"]).to_numpy()
        items = prepared.examples.item_idx[known]
        labels = prepared.examples.label[known]
        n = prepared.space.num_items
        self.clicks = np.bincount(items, weights=labels, minlength=n)
        ratings = np.bincount(items, minlength=n)
        prior = labels.mean()
        # Beta prior worth 10 ratings at the global click rate.
        self.rate = (self.clicks + 10 * prior) / (ratings + 10)

    def pointwise(self, examples: Examples) -> tuple[np.ndarray, np.ndarray]:
        return self.clicks[examples.item_idx], self.rate[examples.item_idx]

    def rank_scores(self, users: list[RankingUser]) -> np.ndarray:
        return np.tile(self.clicks, (len(users), 1)).astype(np.float64)


def shared_ranking_bound(
    users: list[RankingUser], num_items: int, k: int
) -> np.ndarray:
    """``[U, num_items]``: one ranking for every user, of the items by their
    test clicks themselves, each user's weighing ``1 / min(k, relevant)``, the
    share of that user's Recall@K each is worth.

    Not a model: it reads the answers. No ranking shared by all users (a
    popularity of any kind, over any window) scores much above it, since each
    of its top items is worth the most Recall@K summed over users; only the
    few items a user has seen, which that user skips, stand between it and the
    exact best. A personal model's figure above it is what the personal part
    adds.
    """
    worth = np.zeros(num_items)
    for user in users:
        weight = 1.0 / min(k, len(user.relevant))
        for item in user.relevant:
            worth[item] += weight
    return np.tile(worth, (len(users), 1))


@torch.no_grad()
def network_pointwise(model, examples: Examples) -> tuple[np.ndarray, np.ndarray]:
    logit = model(Batch.from_examples(examples)).logit.numpy()
    return logit, 1.0 / (1.0 + np.exp(-logit))


@torch.no_grad()
def network_rank_scores(model, users: list[RankingUser], num_items: int, max_history: int):
    """``[U, num_items]`` ranking scores; column 0 (padding) is never ranked."""
    candidates = torch.arange(num_items)
    if not users:  # a cohort without a test click to rank
        return np.zeros((0, num_items), np.float32)
    parts = []
    for start in range(0, len(users), USERS_PER_CHUNK):
        chunk = users[start : start + USERS_PER_CHUNK]
        parts.append(model.score_candidates(ranking_batch(chunk, max_history), candidates))
    return torch.cat(parts).numpy()


def ranking_batch(users: list[RankingUser], max_history: int) -> Batch:
    history = np.zeros((len(users), max_history), np.int64)
    feedback = np.full((len(users), max_history), FEEDBACK_UNKNOWN, np.int64)
    for row, user in enumerate(users):
        history[row, : len(user.history)] = user.history[-max_history:]
        feedback[row, : len(user.history)] = user.history_feedback[-max_history:]
    return Batch(
        user_idx=torch.tensor([u.user_idx for u in users]),
        user_feats=torch.tensor([u.user_feats for u in users], dtype=torch.int64),
        item_idx=torch.zeros(len(users), dtype=torch.int64),
        history=torch.from_numpy(history),
        history_len=torch.tensor([min(len(u.history), max_history) for u in users]),
        history_feedback=torch.from_numpy(feedback),
    )


def user_ranking(
    scores: np.ndarray, users: list[RankingUser], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's Recall@K and NDCG@K, ``[U]`` each; seen items and padding
    are excluded."""
    scores = scores.copy()
    scores[:, 0] = -np.inf
    for row, user in enumerate(users):
        scores[row, list(user.seen)] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, ndcgs = [], []
    for row, user in enumerate(users):
        hits = np.array([item in user.relevant for item in top[row]], dtype=float)
        ideal = min(k, len(user.relevant))
        recalls.append(hits.sum() / ideal)
        ndcgs.append((hits * discounts).sum() / discounts[:ideal].sum())
    return np.array(recalls), np.array(ndcgs)


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of ``values``: how far the mean could move
    with another draw of as many users (NaN below two)."""
    if len(values) < 2:
        return float("nan")
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def ranking_metrics(recalls: np.ndarray, ndcgs: np.ndarray, k: int) -> dict:
    """Mean Recall@K and NDCG@K from :func:`user_ranking`, and the standard
    error of the mean Recall@K over those users (``recall_at_K_se``); NaN
    for a cohort without a ranked user."""
    if len(recalls) == 0:
        names = (f"recall_at_{k}", f"ndcg_at_{k}", f"recall_at_{k}_se")
        return dict.fromkeys(names, np.nan)
    return {
        f"recall_at_{k}": float(np.mean(recalls)),
        f"ndcg_at_{k}": float(np.mean(ndcgs)),
        f"recall_at_{k}_se": standard_error(recalls),
    }


def pointwise_metrics(score: np.ndarray, prob: np.ndarray, label: np.ndarray) -> dict:
    prob = np.clip(prob, 1e-7, 1 - 1e-7)
    return {
        "auc": float(roc_auc_score(label, score)),
        "log_loss": float(log_loss(label, prob, labels=[0, 1])),
    }


def evaluate_models(
    prepared: Prepared, models: dict, k: int, max_history: int
) -> tuple[dict, pd.DataFrame]:
    """Metrics named ``{model}/{cohort}/{metric}``, and each ranked user's
    Recall@K: a row per user (``user_id``, ``cohort``), a column per model.

    Args:
        models: name to network; "popularity" is added here.
    """
    popularity = Popularity(prepared)
    users = prepared.ranking_users()
    metrics = {}
    recalls = pd.DataFrame(
        {"user_id": [u.user_id for u in users], "cohort": [u.cohort for u in users]}
    )
    for name in tqdm(["popularity", *models], desc="evaluate", unit="model"):
        for cohort in COHORTS:
            test = prepared.select(cohort, "test")
            in_cohort = (recalls["cohort"] == cohort).to_numpy()
            cohort_users = [u for u in users if u.cohort == cohort]
            if name == "popularity":
                score, prob = popularity.pointwise(test)
                ranks = popularity.rank_scores(cohort_users)
            else:
                score, prob = network_pointwise(models[name], test)
                ranks = network_rank_scores(
                    models[name], cohort_users, prepared.space.num_items, max_history
                )
            user_recall, user_ndcg = user_ranking(ranks, cohort_users, k)
            recalls.loc[in_cohort, name] = user_recall
            values = {
                **pointwise_metrics(score, prob, test.label),
                **ranking_metrics(user_recall, user_ndcg, k),
            }
            metrics.update({f"{name}/{cohort}/{m}": v for m, v in values.items()})
    for cohort in COHORTS:
        cohort_users = [u for u in users if u.cohort == cohort]
        bound = shared_ranking_bound(cohort_users, prepared.space.num_items, k)
        values = ranking_metrics(*user_ranking(bound, cohort_users, k), k)
        metrics.update({f"{SHARED_BOUND}/{cohort}/{m}": v for m, v in values.items()})
    return metrics, recalls


def quality_table(metrics: dict, k: int) -> pd.DataFrame:
    columns = ["auc", "log_loss", f"recall_at_{k}", f"ndcg_at_{k}"]
    names = sorted({key.split("/")[0] for key in metrics}, key=_model_order)
    rows = {
        name: {
            f"{cohort} {column}": metrics.get(f"{name}/{cohort}/{column}", np.nan)
            for cohort in COHORTS
            for column in columns
        }
        for name in names
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def _model_order(name: str) -> int:
    return MODELS.index(name) if name in MODELS else len(MODELS)


def plot_quality(table: pd.DataFrame, k: int, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, metric in zip(axes, ["auc", f"recall_at_{k}"]):
        columns = [f"{c} {metric}" for c in COHORTS]
        table[columns].rename(columns=lambda c: c.split()[0]).plot.bar(ax=ax, rot=30)
        ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curves: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("train/teacher_loss", "distill/label", "distill/embedding"):
        if name in curves:
            steps, values = zip(*curves[name])
            axes[0].plot(steps, values, label=name)
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    axes[0].legend()
    for name in ("online_teacher", "ema_teacher", "student"):
        key = f"valid/{name}/auc"
        if key in curves:
            steps, values = zip(*curves[key])
            axes[1].plot(steps, values, marker="o", label=name)
    axes[1].set_xlabel("step")
    axes[1].set_title("valid AUC")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def saved_models(folder: Path) -> list[str]:
    """Teachers, every trained student, and the INT8 student if quantized."""
    students = json.loads((folder / "students.json").read_text())
    teachers_file = folder / "teachers.json"
    extra = json.loads(teachers_file.read_text()) if teachers_file.is_file() else []
    names = ["online_teacher", "ema_teacher", *extra, *students]
    return names + (["student_int8"] if (folder / "student_int8.pt").is_file() else [])


def read_metrics(work_dir: Path) -> dict:
    """``work_dir/eval/metrics.json``: a figure (or null) per metric name.

    Raises:
        ValueError: the file is unreadable or holds something else, naming
            it and the step that rewrites it.
    """
    path = eval_dir(work_dir) / "metrics.json"
    metrics = read_json(path, "evaluate")
    for name, value in metrics.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            problem = f"has {name!r} {value!r}, not a figure"
            raise rewrite_error(path, "evaluate", problem)
    return metrics


def run_evaluate(config: PipelineConfig) -> dict:
    """Scores every saved model; writes ``work_dir/eval`` and logs to MLflow.

    ``eval/lineage.json``, which vouches for ``metrics.json`` to register, is
    removed before the metrics are replaced and written last, once the MLflow
    logging has succeeded: an evaluate that fails midway leaves metrics that
    register refuses.
    """
    from models.store import load_network
    from pipeline.train import model_dir

    from data.features import FeatureSpace

    folder = model_dir(config.work_dir)
    # Read first: a stamp that cannot be read stops the step before its work.
    trained = trained_stamp(config.work_dir)
    quantize = read_quantized(folder)
    quantized = quantize.get("quantized")
    int8 = (folder / "student_int8.pt").is_file()
    if int8 and quantize.get("trained") != trained:
        # Its figures would be logged as the INT8 student of this training.
        raise stale_int8(config.work_dir, ", then evaluate")
    space = FeatureSpace.load(folder / "space.json")
    prepared = prepare(config.work_dir, config.train.max_history, space)
    models = {name: load_network(folder, name, space) for name in saved_models(folder)}
    if "student_int8" not in models:
        logger.warning(
            "%s holds no INT8 student (quantize has not run): it is left out of "
            "these metrics, and register needs it; run `emarec quantize "
            "--work-dir %s`, then evaluate again",
            folder,
            config.work_dir,
        )
    models = with_feedback_views(models)
    metrics, recalls = evaluate_models(
        prepared, models, config.eval_k, config.train.max_history
    )

    out = eval_dir(config.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / LINEAGE).unlink(missing_ok=True)
    # JSON has no NaN: a figure a cohort too small cannot give is null.
    finite = {k: v if np.isfinite(v) else None for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(finite, indent=2, allow_nan=False))
    recalls.to_csv(out / USER_RECALL, index=False)
    lineage = {"trained": trained, "quantized": quantized, "eval_k": config.eval_k}
    table = quality_table(metrics, config.eval_k)
    (out / "quality.md").write_text(table.to_markdown(floatfmt=".4f") + "\n")
    plot_quality(table, config.eval_k, out / "quality.png")
    plot_curves(json.loads((folder / "curves.json").read_text()), out / "training_curves.png")
    with tracked_run(config):
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out), artifact_path="eval")
        mlflow.log_dict(lineage, f"eval/{LINEAGE}")
    write_lineage(out, **lineage)
    return metrics
