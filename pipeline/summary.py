"""The short table a pipeline run ends with."""

from __future__ import annotations

from pipeline.config import PipelineConfig
from pipeline.evaluate import quality_table


def format_summary(config: PipelineConfig, results: dict) -> str:
    ingest, train = results["ingest"], results["train"]
    register = results["register"]
    table = quality_table(results["evaluate"], config.eval_k)
    k = config.eval_k
    columns = ["cold auc", f"cold recall_at_{k}", "warm auc", f"warm recall_at_{k}"]
    lines = [
        "",
        f"data       {ingest['source']}",
        f"rows       in {ingest['rows_in']} = kept {ingest['rows_kept']}"
        f" + quarantined {ingest['rows_quarantined']}",
        *_unknown_lines(ingest.get("unknown_values", {})),
        f"training   {train['teacher_steps']} teacher steps, {train['student_steps']}"
        f" student steps, {train['snapshot_version']} teacher snapshots,"
        f" {train['train_seconds']} s",
        "",
        # n/a: a figure a row has none of (the bound row's AUC).
        table[columns].to_string(float_format=lambda v: f"{v:.4f}", na_rep="n/a"),
        "",
        f"model      {config.model_name} version {register['version']}: "
        + (
            f"now {config.alias!r}"
            if register["promoted"]
            else f"kept out of {config.alias!r}: " + "; ".join(register["refused"])
        ),
        f"MLflow     {config.tracking_uri}, experiment {config.experiment!r}",
        f"work dir   {config.work_dir}",
    ]
    return "\n".join(lines)


def _unknown_lines(counts: dict[str, int]) -> list[str]:
    """One line naming the side features some users or items lack, if any."""
    lacking = [f"{name} {count}" for name, count in counts.items() if count]
    return [f"unknown    {', '.join(lacking)} (read as 'unknown')"] if lacking else []


def print_summary(config: PipelineConfig, results: dict) -> None:
    print(format_summary(config, results))
