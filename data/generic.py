"""Loader for a team's own interaction log (Parquet or CSV).

A small mapping names the columns. Ids must be integers; timestamps are integer
epoch seconds or ISO-8601 datetimes; the label is a rating (click when it is at
least 4) or a 0/1 click. Side-feature columns are taken as categorical strings,
each user's and item's latest value winning.
"""

from __future__ import annotations

import json
import logging
import re
import math
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from data.schema import (
    CLICK_THRESHOLD,
    DataLayoutError,
    LoadedData,
    Quarantine,
    interactions_frame,
)

logger = logging.getLogger(__name__)


def read_structured(path: Path, option: str):
    """The content of a JSON or YAML file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} points at {path}, which does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as error:  # yaml and json raise their own error types
        raise ValueError(f"{option} {path} does not parse: {error}") from None


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the file"
    return f"{where}: {first['msg']}"


class ColumnMapping(BaseModel):
    """Which column of the log holds what."""

    model_config = ConfigDict(extra="forbid")

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    rating: str | None = None
    click: str | None = None
    user_features: list[str] = []
    item_features: list[str] = []
    title: str | None = None

    @model_validator(mode="after")
    def _one_label(self) -> "ColumnMapping":
        if (self.rating is None) == (self.click is None):
            raise ValueError(
                "the mapping must name exactly one label column: 'rating' (1-5, "
                "click when >= 4) or 'click' (0/1)"
            )
        return self

    @classmethod
    def from_file(cls, path: Path) -> "ColumnMapping":
        """Reads a mapping from a JSON or YAML file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file does not parse, or is not a valid mapping;
                the message names the file.
        """
        raw = read_structured(path, "--mapping")
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            allowed = ", ".join(cls.model_fields)
            raise ValueError(
                f"--mapping {path}: {_first_error(error)}; the keys are {allowed}"
            ) from None


def read_log(path: Path) -> pd.DataFrame:
    """Reads a Parquet or CSV log as strings-or-values without coercion."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix in (".csv", ".tsv"):
        sep = "\t" if path.suffix == ".tsv" else ","
        try:
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            # A line pandas cannot split stops the whole file, not one row.
            raise DataLayoutError(
                path,
                _line_of(error),
                f"cannot be read as {path.suffix[1:].upper()}: {error}",
                "Fix that line (field count, quoting or encoding: UTF-8)",
            ) from None
    raise DataLayoutError(
        path, 1, f"unknown file type {path.suffix!r}", "Use .parquet, .csv or .tsv"
    )


def _line_of(error: Exception) -> int:
    found = re.search(r"line (\d+)|row (\d+)", str(error))
    return int(next(g for g in found.groups() if g)) if found else 1


def load_generic(path: Path, mapping: ColumnMapping) -> LoadedData:
    """Loads a generic interaction log.

    Args:
        path: a ``.parquet``, ``.csv`` or ``.tsv`` file.
        mapping: the columns to use.

    Raises:
        DataLayoutError: a mapped column is missing from the file.
    """
    path = Path(path)
    frame = read_log(path)
    _check_columns(path, frame, mapping)
    quarantine = Quarantine()
    # CSV line numbers count the header; Parquet rows count from 1.
    offset = 2 if path.suffix != ".parquet" else 1
    columns = {"user_id": [], "item_id": [], "rating": [], "click": [], "timestamp": []}
    kept_rows = []
    seen = set()
    for index, row in enumerate(frame.to_dict("records")):
        parsed = _parse_row(row, mapping)
        if isinstance(parsed, str):
            quarantine.add(path.name, index + offset, parsed, json.dumps(row, default=str))
            continue
        key = (parsed[0], parsed[1], parsed[4])
        if key in seen:
            reason = "duplicate of an earlier row (same user, item and timestamp)"
            quarantine.add(path.name, index + offset, reason, json.dumps(row, default=str))
            continue
        seen.add(key)
        for name, value in zip(columns, parsed):
            columns[name].append(value)
        kept_rows.append(index)
    # Side features take each user's and item's latest value: by timestamp,
    # not by file order (a log need not be sorted).
    by_time = np.argsort(np.asarray(columns["timestamp"], np.int64), kind="stable")
    kept = frame.iloc[np.asarray(kept_rows, np.int64)[by_time]]
    logger.info("read %s: %d kept, %d quarantined", path, len(kept), len(quarantine))
    return LoadedData(
        interactions=interactions_frame(columns),
        users=_side_table(kept, mapping.user, "user_id", mapping.user_features),
        items=_items(kept, mapping),
        user_features={name: "categorical" for name in mapping.user_features},
        item_features=list(mapping.item_features),
        quarantine=quarantine.frame(),
        rows_in=len(frame),
        source=str(path),
    )


def _check_columns(path: Path, frame: pd.DataFrame, mapping: ColumnMapping) -> None:
    wanted = [mapping.user, mapping.item, mapping.timestamp]
    wanted += [c for c in (mapping.rating, mapping.click, mapping.title) if c]
    wanted += mapping.user_features + mapping.item_features
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataLayoutError(
            path,
            1,
            f"columns {missing} named by the mapping are not in the file "
            f"(it has {list(frame.columns)})",
            "Fix the column names in the mapping",
        )


def _parse_row(row: dict, mapping: ColumnMapping) -> tuple | str:
    """Returns the parsed interaction, or the reason the row is refused."""
    user_id, item_id = _as_int(row[mapping.user]), _as_int(row[mapping.item])
    if user_id is None or user_id < 0:
        return f"{mapping.user} {row[mapping.user]!r} is not a non-negative integer"
    if item_id is None or item_id < 0:
        return f"{mapping.item} {row[mapping.item]!r} is not a non-negative integer"
    timestamp = _as_timestamp(row[mapping.timestamp])
    if timestamp is None:
        return (
            f"{mapping.timestamp} {row[mapping.timestamp]!r} is neither epoch "
            "seconds nor an ISO-8601 datetime"
        )
    if mapping.rating:
        rating = _as_float(row[mapping.rating])
        if rating is None or not 1 <= rating <= 5:
            return f"{mapping.rating} {row[mapping.rating]!r} is not a number from 1 to 5"
        return user_id, item_id, rating, int(rating >= CLICK_THRESHOLD), timestamp
    click = _as_int(row[mapping.click])
    if click not in (0, 1):
        return f"{mapping.click} {row[mapping.click]!r} is not 0 or 1"
    return user_id, item_id, float("nan"), click, timestamp


# Ids and timestamps are stored as int64.
INT64_MAX = 2**63 - 1


def _as_int(value) -> int | None:
    """An integer that fits int64, else None (the row is then quarantined)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value.strip())
    else:
        as_float = _as_float(value)
        if as_float is None or as_float != int(as_float):
            return None
        number = int(as_float)
    return number if -INT64_MAX <= number <= INT64_MAX else None


def _as_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    # NaN and infinities are not values (int(inf) would raise OverflowError).
    return number if math.isfinite(number) else None


def _as_timestamp(value) -> int | None:
    number = _as_int(value)
    if number is not None:
        return number
    if isinstance(value, pd.Timestamp):
        return int(value.timestamp())
    text = str(value).strip()
    # pandas also reads words such as "now" and "today", which would make a
    # row's time the moment of ingest: only dates written out are accepted.
    if not text[:4].isdigit():
        return None
    try:
        return int(pd.Timestamp(text).timestamp())
    except (ValueError, TypeError, OverflowError):
        return None


def _side_table(kept: pd.DataFrame, key: str, name: str, features: list[str]):
    table = kept[[key, *features]].astype({f: str for f in features})
    table = table.assign(**{name: kept[key].map(_as_int)})
    table = table.drop(columns=[key]) if key != name else table
    return table.drop_duplicates(name, keep="last").reset_index(drop=True)[
        [name, *features]
    ]


def _items(kept: pd.DataFrame, mapping: ColumnMapping) -> pd.DataFrame:
    table = _side_table(kept, mapping.item, "item_id", mapping.item_features)
    for feature in mapping.item_features:
        table[feature] = table[feature].map(lambda v: [v])
    if mapping.title:
        titles = kept.assign(item_id=kept[mapping.item].map(_as_int))
        titles = titles.drop_duplicates("item_id", keep="last")
        table = table.merge(
            titles[["item_id", mapping.title]].rename(columns={mapping.title: "title"}),
            on="item_id",
        )
    else:
        table["title"] = table.item_id.map(lambda i: f"item {i}")
    return table
