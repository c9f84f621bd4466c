"""Ingest: read the raw data, quarantine bad rows, write Parquet with a fixed schema."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data.features import is_missing, unknown_values
from data.load import load_data
from data.locate import resolve_data
from data.schema import INTERACTIONS_SCHEMA, QUARANTINE_SCHEMA, LoadedData
from data.split import split_counts, split_interactions
from pipeline.config import PipelineConfig
from pipeline.lineage import LINEAGE, read_json, stamp, write_lineage

logger = logging.getLogger(__name__)

# Example values a warning shows.
EXAMPLES = 5


def ingest_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "ingest"


def run_ingest(config: PipelineConfig) -> dict:
    """Loads the configured data and writes it under ``work_dir/ingest``.

    Returns:
        Counts: rows in, kept and quarantined, users and rows per split, and
        per side feature (``user.<name>``, ``item.<name>``) the users or items
        whose value the model reads as "unknown" (each logged as a warning).
    """
    source = resolve_data(config.data)
    loaded = load_data(source, config.mapping)
    out = ingest_dir(config.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    # What vouches for the data goes before the data does: an ingest refused
    # or stopped from here on leaves files that later steps refuse.
    drop_stamps(out)
    write_loaded(loaded, out)
    events = split_interactions(loaded.interactions)
    _check_trainable(source, events)
    summary = {
        "source": str(source),
        "rows_in": loaded.rows_in,
        "rows_kept": loaded.rows_kept,
        "rows_quarantined": loaded.rows_quarantined,
        "quarantined_lines": len(loaded.quarantine),
        "users": int(loaded.users.user_id.nunique()),
        "items": int(loaded.items.item_id.nunique()),
        "unknown_values": _count_unknown(source, loaded),
        **split_counts(events),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_lineage(out, ingested=stamp())
    logger.info(
        "ingested %s: rows_in=%d = rows_kept=%d + rows_quarantined=%d (quarantine: %s)",
        source,
        loaded.rows_in,
        loaded.rows_kept,
        loaded.rows_quarantined,
        out / "quarantine.parquet",
    )
    return summary


def _check_trainable(source: Path, events) -> None:
    """Refuses data the pipeline cannot train and evaluate on, before it tries."""
    train = events[(events.cohort == "warm") & (events.split == "train")]
    tests = {c: int(((events.cohort == c) & (events.split == "test")).sum()) for c in ("warm", "cold")}
    if len(train) == 0 or 0 in tests.values():
        raise ValueError(
            f"{source}: {len(events)} rows kept, {len(train)} warm train rows and "
            f"test rows {tests}: too little to train and evaluate. Each cohort "
            "needs users with test events (cold users are user_id % 5 == 0 with "
            "more than 5 events); see the quarantine file for refused rows"
        )


def _count_unknown(source: Path, loaded: LoadedData) -> dict[str, int]:
    """Counts, and logs, the side-feature values the model will read as unknown.

    Those users and items are kept (they still have ids and interactions),
    but their feature gets no embedding of its own, so it must not go unseen.
    """
    found = unknown_values(
        loaded.users, loaded.items, loaded.user_features, loaded.item_features
    )
    for name, values in found.items():
        if not values:
            continue
        side, feature = name.split(".", 1)
        shown = sorted({"<missing>" if is_missing(v) else repr(v) for v in values})
        logger.warning(
            "%s: %d %ss have no usable %r (e.g. %s); they train and serve with "
            "%s 'unknown'",
            source,
            len(values),
            side,
            feature,
            ", ".join(shown[:EXAMPLES]),
            feature,
        )
    return {name: len(values) for name, values in found.items()}


def write_loaded(loaded: LoadedData, out: Path) -> None:
    table = pa.Table.from_pandas(loaded.interactions, INTERACTIONS_SCHEMA, preserve_index=False)
    pq.write_table(table, out / "interactions.parquet")
    quarantine = pa.Table.from_pandas(loaded.quarantine, QUARANTINE_SCHEMA, preserve_index=False)
    pq.write_table(quarantine, out / "quarantine.parquet")
    loaded.users.to_parquet(out / "users.parquet", index=False)
    loaded.items.to_parquet(out / "items.parquet", index=False)
    meta = {"user_features": loaded.user_features, "item_features": loaded.item_features}
    (out / "features.json").write_text(json.dumps(meta))


def interactions_path(work_dir: Path) -> Path:
    return ingest_dir(work_dir) / "interactions.parquet"


def drop_stamps(out: Path) -> None:
    """Removes what vouches for the data in ``out`` (``summary.json`` and the
    stamp): later steps refuse it until an ingest completes."""
    (out / "summary.json").unlink(missing_ok=True)
    (out / LINEAGE).unlink(missing_ok=True)


def read_ingested(
    work_dir: Path, users: list[int] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Interactions, users, items and the feature description written by ingest.

    Args:
        users: read only these users' interactions (a rank's part of a sharded
            run), through a Parquet filter; every user by default.
    """
    out = ingest_dir(work_dir)
    if not (out / "interactions.parquet").is_file():
        raise FileNotFoundError(
            f"{out} has no ingested data: run `emarec ingest --work-dir {work_dir}` first"
        )
    if not ((out / "summary.json").is_file() and (out / LINEAGE).is_file()):
        again = f"run `emarec ingest --work-dir {work_dir}` again"
        if not (Path(work_dir) / "config.json").is_file():
            # A refused first ingest saves no settings: without its --data,
            # the retry would find the default data instead.
            again += " with the --data (and --mapping) it was given"
        raise FileNotFoundError(
            f"{out} holds an ingest that was refused or stopped (its data is "
            "there to inspect, with the quarantine file): fix what its error "
            f"said and {again}"
        )
    read_json(out / "summary.json", "ingest")  # one cut short names itself
    items = pd.read_parquet(out / "items.parquet")
    meta = json.loads((out / "features.json").read_text())
    for name in meta["item_features"]:
        items[name] = items[name].map(list)
    return (
        pd.read_parquet(
            out / "interactions.parquet",
            filters=None if users is None else [("user_id", "in", users)],
        ),
        pd.read_parquet(out / "users.parquet"),
        items,
        meta,
    )
