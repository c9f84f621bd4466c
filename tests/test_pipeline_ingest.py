"""pipeline.ingest on a generic log: every row accounted for, and side-feature
values the model will read as "unknown" counted and logged, not lost."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from data.features import FeatureSpace, is_missing
from pipeline.config import PipelineConfig
from pipeline.ingest import run_ingest

EVENTS_PER_USER = 8  # cold users (id % 5 == 0) need more than 5


def shop_log(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    """A trainable click log whose side features have holes, and its mapping."""
    rows = []
    for user in range(1, 11):
        for n in range(EVENTS_PER_USER):
            item = (user + n) % 12 + 1
            rows.append((user, item, (user * 7 + n) % 2, user * 100 + n))
    frame = pd.DataFrame(rows, columns=["customer", "product", "clicked", "ts"])
    # Users 3 and 4 have no country on any row; user 6 "none" is a real value.
    country = {3: "", 4: "", 6: "none"}
    frame["country"] = frame.customer.map(
        lambda u: country.get(u, "fr" if u % 2 else "de")
    )
    frame["category"] = frame["product"].map(lambda i: "" if i == 5 else f"c{i % 3}")
    log = tmp_path / "events.csv"
    frame.to_csv(log, index=False)
    mapping = tmp_path / "mapping.json"
    mapping.write_text(
        json.dumps(
            {
                "user": "customer",
                "item": "product",
                "timestamp": "ts",
                "click": "clicked",
                "user_features": ["country"],
                "item_features": ["category"],
            }
        )
    )
    return log, mapping, frame


def test_unknown_side_feature_values_are_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log, mapping, frame = shop_log(tmp_path)
    config = PipelineConfig(data=log, mapping=mapping, work_dir=tmp_path / "w")
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        summary = run_ingest(config)

    users = frame.drop_duplicates("customer")
    items = frame.drop_duplicates("product")
    no_country = int(users.country.map(is_missing).sum())
    no_category = int(items.category.map(is_missing).sum())
    assert (no_country, no_category) == (2, 1), "the log has holes to count"
    assert summary["unknown_values"] == {
        "user.country": no_country,
        "item.category": no_category,
    }
    saved = json.loads((tmp_path / "w" / "ingest" / "summary.json").read_text())
    assert saved["unknown_values"] == summary["unknown_values"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"{no_country} users have no usable 'country' (e.g. <missing>)" in w
        for w in warnings
    ), warnings
    assert any(f"{no_category} items have no usable 'category'" in w for w in warnings)
    assert summary["rows_in"] == summary["rows_kept"] + summary["rows_quarantined"]
    assert summary["rows_in"] == len(frame)


def test_missing_values_are_not_tokens_of_their_own(tmp_path: Path) -> None:
    log, mapping, _ = shop_log(tmp_path)
    run_ingest(PipelineConfig(data=log, mapping=mapping, work_dir=tmp_path / "w"))
    out = tmp_path / "w" / "ingest"
    users = pd.read_parquet(out / "users.parquet")
    items = pd.read_parquet(out / "items.parquet")
    items["category"] = items["category"].map(list)
    space = FeatureSpace.build(
        users, items, {"country": "categorical"}, ["category"], users.user_id.tolist()
    )
    assert space.user_vocab["country"] == ["de", "fr", "none"]
    assert space.item_vocab["category"] == ["c0", "c1", "c2"]
    tokens = space.encode_users(users)
    assert tokens[3] == tokens[4] == [0], "no country: the unknown token"
