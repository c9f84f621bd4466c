"""Register: export the serving bundle, register it in MLflow, and move the
``champion`` alias to it only when it passes the gate.

The gate: no worse than the current champion on cold Recall@K (INT8 student,
which serves new users) and on warm Recall@K (EMA teacher, which serves known
users), give or take ``gate_tolerance_se`` standard errors of the new
version's mean over its test users. The first version always passes.

Without the tolerance a retrain on the same data is as likely to come out a
little below the champion as above it (a student's cold Recall@10 moved by
about 0.01 between two runs of one seed, and its standard error over
MovieLens-100K's 187 cold users is about 0.018), and the champion ratchets to
the luckiest run while the catalogue moves on. With it, a series of small
drops, each within the tolerance, can add up: the gate compares each version
with the champion only.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from models.bundle import BUNDLE_FORMAT, ModelBundle
from pipeline.config import PipelineConfig
from pipeline.evaluate import eval_dir, read_metrics
from pipeline.ingest import ingest_dir, read_ingested
from pipeline.lineage import (
    check_lineage,
    read_json,
    read_lineage,
    read_quantized,
    rewrite_error,
)
from pipeline.tracking import run_id, tracked_run
from pipeline.train import model_dir

logger = logging.getLogger(__name__)

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
BUNDLE_FILES = (
    "space.json", "ema_teacher.json", "ema_teacher.pt", "student_int8.json",
    "student_int8.pt", "quantize.json",
)  # fmt: skip


def gate_metrics(metrics: dict, k: int) -> dict[str, float]:
    """The gate's figures and their standard errors over the test users."""
    names = {
        "cold": f"student_int8/cold/recall_at_{k}",
        "warm": f"ema_teacher/warm/recall_at_{k}",
    }
    gate = {cohort: metrics[name] for cohort, name in names.items()}
    for cohort, name in names.items():
        gate[f"{cohort}_se"] = metrics[f"{name}_se"]
    return gate


GATE_METRICS = {
    "cold": "cold Recall@{k} (INT8 student)",
    "warm": "warm Recall@{k} (EMA teacher)",
}


def gate_refusals(
    candidate: dict, champion: dict | None, tolerance_se: float, k: int
) -> list[str]:
    """Why ``candidate`` (from :func:`gate_metrics`) may not replace the
    ``champion``: one line per figure more than ``tolerance_se`` of its
    standard errors below the champion's, or one per figure that could not
    be measured; empty when it passes, as the first version with both
    figures always does."""
    unmeasured = [
        f"{metric.format(k=k)} could not be measured (no test user of that "
        "cohort has a click to rank): a version without it is never champion"
        for cohort, metric in GATE_METRICS.items()
        if candidate[cohort] is None or not math.isfinite(candidate[cohort])
    ]
    if unmeasured:
        return unmeasured
    if champion is None:
        return []
    if champion.get("k", k) != k:
        return [
            f"the champion (version {champion['version']}) was measured on "
            f"Recall@{champion['k']} and this version on Recall@{k}: not "
            "comparable; use the champion's eval_k"
        ]
    refusals = []
    for cohort, metric in GATE_METRICS.items():
        se = candidate[f"{cohort}_se"]
        # Under two ranked users there is no standard error (NaN, or null
        # in metrics.json): no tolerance.
        known = se is not None and math.isfinite(se)
        margin = tolerance_se * se if known else 0.0
        if candidate[cohort] < champion[cohort] - margin:
            why = (
                f"{tolerance_se:g} standard errors of {se:.4f}"
                if known
                else "no standard error"
            )
            refusals.append(
                f"{metric.format(k=k)} {candidate[cohort]:.4f} is below the "
                f"champion's (version {champion['version']}) "
                f"{champion[cohort]:.4f} by more than {margin:.4f} ({why})"
            )
    return refusals


def evaluated_k(config: PipelineConfig) -> int:
    """The K the run's metrics were measured at, once the networks, their
    INT8 student and the metrics are checked to come from one training.

    Raises:
        ValueError: a step's output is stale (see
            :func:`pipeline.lineage.check_lineage`).
    """
    folder = model_dir(config.work_dir)
    quantized = read_quantized(folder)
    evaluated = read_lineage(eval_dir(config.work_dir))
    ingested = read_lineage(ingest_dir(config.work_dir))
    check_lineage(ingested, read_lineage(folder), quantized, evaluated, config.work_dir)
    k = evaluated.get("eval_k", config.eval_k)
    if k != config.eval_k:
        logger.warning(
            "eval/metrics.json was measured at K=%d: the gate compares "
            "Recall@%d, not the eval_k %d of these settings",
            k,
            k,
            config.eval_k,
        )
    return k


def export_bundle(config: PipelineConfig, k: int | None = None) -> Path:
    """Writes ``work_dir/bundle``: networks, vocabularies, known users, catalogue.

    Known users are the warm users, with the history (items, whether each
    was clicked and its rating, NaN where the data has none) and seen items
    of their train and valid events: what the
    model knew when it was trained. Their test events stay unseen, so that
    replaying the test period measures real CTR.

    Args:
        k: the K of the gate's Recall@K (the config's eval_k by default).

    Raises:
        ValueError: the bundle does not load as serving would load it.
    """
    from data.split import split_interactions

    source, bundle = model_dir(config.work_dir), Path(config.work_dir) / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    for name in BUNDLE_FILES:
        shutil.copy2(source / name, bundle / name)
    interactions, users, items, meta = read_ingested(config.work_dir)
    events = split_interactions(interactions)
    known = events[(events.cohort == "warm") & events.split.isin(["train", "valid"])]
    width = config.train.max_history
    per_user = (
        known.astype({"click": bool})
        .groupby("user_id")[["item_id", "click", "rating"]]
        .agg(list)
    )
    items_of, clicks_of = per_user["item_id"], per_user["click"]
    ratings_of = per_user["rating"]
    table = users[users.user_id.isin(per_user.index)].copy()
    table["history"] = table.user_id.map(lambda u: items_of[u][-width:])
    table["history_clicked"] = table.user_id.map(lambda u: clicks_of[u][-width:])
    table["history_rating"] = table.user_id.map(lambda u: ratings_of[u][-width:])
    table["seen"] = table.user_id.map(lambda u: sorted(set(items_of[u])))
    table.to_parquet(bundle / "users.parquet", index=False)
    items[["item_id", "title"]].to_parquet(bundle / "items.parquet", index=False)
    metrics = read_metrics(config.work_dir)
    k = config.eval_k if k is None else k
    try:
        gate = gate_metrics(metrics, k)
    except KeyError as missing:
        raise rewrite_error(
            eval_dir(config.work_dir) / "metrics.json",
            "evaluate",
            f"has no {missing.args[0]!r}, which the gate reads at K={k}",
        ) from None
    info = {
        "format": BUNDLE_FORMAT,
        "max_history": width,
        "embedding_dim": config.train.embedding_dim,
        "user_features": meta["user_features"],
        "created": datetime.now(timezone.utc).isoformat(),
        "training_run_id": run_id(config.work_dir),
        "gate": gate,
    }
    (bundle / "bundle.json").write_text(json.dumps(info, indent=2))
    try:
        ModelBundle(bundle)
    except Exception as error:  # whatever torch or pandas raise on a bad file
        raise ValueError(
            f"the bundle exported from {config.work_dir} does not load as the "
            f"server would load it ({type(error).__name__}: {error}); re-run "
            "the step that wrote the broken file (train, or quantize for "
            "student_int8) before register"
        ) from None
    return bundle


def champion_gate(client: MlflowClient, config: PipelineConfig) -> dict | None:
    """The current champion's gate metrics, or None when there is no champion."""
    try:
        version = client.get_model_version_by_alias(config.model_name, config.alias)
    except MlflowException:
        return None
    tags = version.tags
    champion = {
        "version": version.version,
        "cold": float(tags["gate.cold_recall"]),
        "warm": float(tags["gate.warm_recall"]),
    }
    if "gate.k" in tags:  # versions registered before it was tagged lack it
        champion["k"] = int(tags["gate.k"])
    return champion


def _student_trained(config: PipelineConfig) -> bool:
    """False (with a warning) when the cold-start student never took a step."""
    path = model_dir(config.work_dir) / "train_summary.json"
    summary = read_json(path, "train")
    for key in ("student_steps", "teacher_steps"):
        if type(summary.get(key)) is not int:
            raise rewrite_error(path, "train", f"has no count of {key}")
    if summary["student_steps"] > 0:
        return True
    logger.warning(
        "the student took no distillation step (%d teacher steps, distill_interval "
        "%d, student_epochs %d): registering without promoting",
        summary["teacher_steps"],
        config.train.distill_interval,
        config.train.student_epochs,
    )
    return False


def lineage_tags(config: PipelineConfig) -> dict[str, str]:
    """The version tags naming the training and the INT8 student this run
    registers, or ``{}`` for a run made before the stamps existed."""
    folder = model_dir(config.work_dir)
    trained = read_lineage(folder).get("trained")
    quantized = read_quantized(folder).get("quantized")
    if not (trained and quantized):
        return {}
    return {"lineage.trained": trained, "lineage.quantized": quantized}


def registered_version(
    client: MlflowClient, config: PipelineConfig, tags: dict, champion: dict | None
) -> ModelVersion | None:
    """The version already registered with these lineage ``tags`` (the same
    networks and INT8 student), if any: the champion when it is one, else
    the latest. A retried register (an Airflow task retry, say) finds it
    rather than registering the same model again."""
    if not tags:
        return None
    # The stamps are hex: the query holds no text a user chose (a model name
    # with a quote in it would break it); the name is compared here instead.
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    found = [
        version
        for version in client.search_model_versions(query)
        if version.name == config.model_name
    ]
    if not found:
        return None
    for version in found:
        if champion is not None and version.version == champion["version"]:
            return version
    return max(found, key=lambda version: int(version.version))


def run_register(config: PipelineConfig) -> dict:
    """Logs and registers the bundle; promotes it if it passes the gate.

    A version already registered from the same training and INT8 student is
    reused, its gate tags refreshed and the gate run again against the
    current champion, instead of a second version of the same model.

    Returns:
        ``version``, ``promoted``, ``reused`` and the gate figures compared.
    """
    k = evaluated_k(config)
    bundle = export_bundle(config, k)
    gate = json.loads((bundle / "bundle.json").read_text())["gate"]
    lineage = lineage_tags(config)
    # Read before anything is registered: an unreadable summary stops here.
    student_trained = _student_trained(config)
    client = MlflowClient(config.tracking_uri)
    with tracked_run(config) as run:
        current = champion_gate(client, config)
        version = registered_version(client, config, lineage, current)
        reused = version is not None
        if reused:
            logger.info(
                "version %s of %r already holds this training and INT8 student "
                "(tags %s): reusing it, not registering it again",
                version.version,
                config.model_name,
                ", ".join(f"{key}={value}" for key, value in lineage.items()),
            )
        else:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={"bundle": str(bundle)},
                pip_requirements=["emarec"],
            )
            # Tagged as it is created: a register stopped right after finds
            # this version on its next try.
            version = mlflow.register_model(
                info.model_uri, config.model_name, tags=lineage or None
            )
        tags = {
            "gate.cold_recall": gate["cold"],
            "gate.warm_recall": gate["warm"],
            "gate.cold_recall_se": gate["cold_se"],
            "gate.warm_recall_se": gate["warm_se"],
            "gate.k": k,
            "gate.tolerance_se": config.gate_tolerance_se,
            "training_run_id": run.info.run_id,
        }
        for key, value in tags.items():
            client.set_model_version_tag(
                config.model_name, version.version, key, str(value)
            )
        already = current is not None and current["version"] == version.version
        if already:  # it passed when it was promoted; never compared with itself
            refused = []
        else:
            refused = gate_refusals(gate, current, config.gate_tolerance_se, k)
            if not student_trained:
                refused.append("the student took no distillation step")
        promoted = not refused
        if promoted:
            if not already:
                client.set_registered_model_alias(
                    config.model_name, config.alias, version.version
                )
            if "gate.refused" in version.tags:  # refused on an earlier try
                client.delete_model_version_tag(
                    config.model_name, version.version, "gate.refused"
                )
        else:
            client.set_model_version_tag(
                config.model_name, version.version, "gate.refused", "; ".join(refused)
            )
        mlflow.log_metric("register/promoted", float(promoted))
        mlflow.set_tag("registered_version", version.version)
    result = {
        "version": version.version,
        "promoted": promoted,
        "reused": reused,
        "refused": refused,
        "candidate": gate,
        "champion_before": current,
        "tolerance_se": config.gate_tolerance_se,
    }
    if already:
        logger.info("version %s already is %r", version.version, config.alias)
    elif promoted:
        logger.info("version %s is now %r", version.version, config.alias)
    else:
        tolerance = any("standard error" in reason for reason in refused)
        logger.warning(
            "version %s kept out of %r: %s%s",
            version.version,
            config.alias,
            "; ".join(refused),
            " (gate_tolerance_se in the pipeline config sets the gate's tolerance)"
            if tolerance
            else "",
        )
    (Path(config.work_dir) / "register.json").write_text(json.dumps(result, indent=2))
    return result
