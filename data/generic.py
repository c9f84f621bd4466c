"""Loader for a team's own interaction log (Parquet or CSV).

A small mapping names the columns. Ids must be integers; timestamps are epoch
seconds (or milliseconds and finer, read by their size) or ISO-8601
datetimes; the label is a rating (click when it is at
least 4) or a 0/1 click. Side-feature columns are taken as categorical strings,
each user's and item's latest known value winning; an empty cell is a missing
value (read as "unknown"), not a category, and does not erase an earlier value.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from data.features import is_missing
from data.schema import (
    CLICK_THRESHOLD,
    DataLayoutError,
    LoadedData,
    Quarantine,
    interactions_frame,
)
from data.structured import explain, read_structured

logger = logging.getLogger(__name__)


class MappingError(ValueError):
    """The column mapping does not fit the log; the message names both and the fix."""


class ColumnMapping(BaseModel):
    """Which column of the log holds what."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field("user_id", description="column of user ids (integers)")
    item: str = Field("item_id", description="column of item ids (integers)")
    timestamp: str = Field(
        "timestamp", description="column of epoch seconds or ISO-8601 datetimes"
    )
    rating: str | None = Field(None, description="column of 1-5 ratings")
    click: str | None = Field(None, description="column of 0/1 clicks")
    user_features: list[str] = Field(
        [], description="columns of user side features, e.g. [country, device]"
    )
    item_features: list[str] = Field(
        [], description="columns of item side features, e.g. [category]"
    )
    title: str | None = Field(None, description="column of item titles")

    @model_validator(mode="after")
    def _one_label(self) -> "ColumnMapping":
        if (self.rating is None) == (self.click is None):
            raise ValueError(
                "the mapping must name exactly one label column: 'rating' (1-5, "
                "click when >= 4) or 'click' (0/1)"
            )
        return self

    @model_validator(mode="after")
    def _one_role_per_column(self) -> "ColumnMapping":
        """A column is an id, the time, the label or one feature, not two of
        them (the title may also be an item feature)."""
        for name in ("user_features", "item_features"):
            listed = getattr(self, name)
            twice = sorted({c for c in listed if listed.count(c) > 1})
            if twice:
                raise ValueError(
                    f"{name} lists {', '.join(map(repr, twice))} more than once: "
                    "list each column once"
                )
        roles: dict[str, str] = {}
        for field, columns in self.columns().items():
            if field == "title":
                continue
            for column in columns:
                if column in roles:
                    raise ValueError(
                        f"column {column!r} is named by both {roles[column]!r} and "
                        f"{field!r}: each column has one role; name another column "
                        f"for one of them"
                    )
                roles[column] = field
        return self

    @classmethod
    def from_file(cls, path: Path) -> "ColumnMapping":
        """Reads a mapping from a JSON or YAML file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file does not parse, or is not a valid mapping;
                the message names the file, each wrong field and the fix
                (an unknown key gets the list of allowed keys).
        """
        raw = read_structured(path, "--mapping")
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise MappingError(explain(error, cls, path)) from None

    def columns(self) -> dict[str, list[str]]:
        """The columns each field names, by field (only fields that name any)."""
        named = {
            name: getattr(self, name)
            for name in ("user", "item", "timestamp", "rating", "click", "title")
        }
        named = {name: [column] for name, column in named.items() if column}
        features = {
            "user_features": self.user_features,
            "item_features": self.item_features,
        }
        return named | {name: list(cols) for name, cols in features.items() if cols}


def read_log(path: Path) -> tuple[pd.DataFrame, list[tuple[int, str, str]]]:
    """Reads a Parquet or CSV log as strings-or-values without coercion.

    Returns:
        One row per record, indexed by where it is in the file: a CSV's
        physical line (the header is line 1), a Parquet file's row from 1;
        and the records that cannot be rows, each as (line, reason, text).

    Raises:
        DataLayoutError: the file cannot be read as its type.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        frame.index = pd.RangeIndex(1, len(frame) + 1)
        return frame, []
    if path.suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if path.suffix == ".tsv" else ",")
    raise DataLayoutError(
        path, 1, f"unknown file type {path.suffix!r}", "Use .parquet, .csv or .tsv"
    )


def _read_delimited(
    path: Path, sep: str
) -> tuple[pd.DataFrame, list[tuple[int, str, str]]]:
    """A CSV or TSV as strings, indexed by each record's first physical line,
    and the records refused, as (line, reason, text).

    pandas numbers records, not lines: after a blank line (or a quoted field
    that spans lines) its row numbers stop matching the file. Blank lines are
    not records; a record shorter than the header is padded with missing
    values. One longer than the header (its fields cannot be assigned), or
    with bytes that are not UTF-8, is refused, to be quarantined with its
    line, as is one with a NUL byte (binary data, which the CSV reader
    would keep); the rest of the file is still read. A header that cannot be read,
    or quoting the CSV reader cannot follow (a quote left open to the end of
    the file, text after a closing quote), stops the file at the line of the
    record it began.
    """
    kind = path.suffix[1:].upper()
    header, rows, lines, refused = None, [], [], []
    not_utf8: dict[int, str] = {}
    with open(path, "rb") as f:
        # strict: a quote left open to the end of the file is an error at the
        # line that opened it, not the rest of the file read as one field.
        lines_in = _utf8_lines(path, f, kind, not_utf8)
        reader = csv.reader(lines_in, delimiter=sep, strict=True)
        line = 1
        try:
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                bad = [not_utf8[n] for n in range(start, line) if n in not_utf8]
                if header is None:
                    if bad:
                        raise _unreadable(path, start, kind, bad[0])
                    header = _header(path, start, fields)
                    continue
                text = sep.join(fields)
                if not bad and "\x00" in text:
                    bad = ["a NUL byte (binary data, not text)"]
                if bad or len(fields) > len(header):
                    counts = f"{len(fields)} fields where the header has {len(header)}"
                    reason = f"cannot be read as {kind}: {bad[0] if bad else counts}"
                    refused.append((start, reason, text))
                else:
                    rows.append(fields + [None] * (len(header) - len(fields)))
                    lines.append(start)
        except csv.Error as error:
            raise _unreadable(path, line, kind, str(error)) from None
    if header is None:
        raise DataLayoutError(
            path, 1, "the file is empty", "Write the column names on line 1"
        )
    index = pd.Index(lines, dtype="int64")
    return pd.DataFrame(rows, columns=header, index=index, dtype=str), refused


def _utf8_lines(path: Path, f, kind: str, not_utf8: dict[int, str]):
    """Decodes line by line; a line that is not UTF-8 is decoded with
    replacement characters and noted in ``not_utf8`` (line number to
    problem), so that its record is refused on its own line."""
    for number, raw in enumerate(f, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            not_utf8[number] = f"not UTF-8 ({error})"
            text = raw.decode("utf-8", errors="replace")
        yield text


def _unreadable(path: Path, line: int, kind: str, problem: str) -> DataLayoutError:
    fix = "Fix that line (field count, quoting or encoding: UTF-8)"
    return DataLayoutError(path, line, f"cannot be read as {kind}: {problem}", fix)


def _header(path: Path, line: int, fields: list[str]) -> list[str]:
    """The column names; one named twice would make its values ambiguous."""
    twice = sorted({name for name in fields if fields.count(name) > 1})
    if twice:
        raise DataLayoutError(
            path,
            line,
            f"the header names columns {twice} more than once",
            "Give every column its own name",
        )
    return fields


def load_generic(
    path: Path, mapping: ColumnMapping, mapping_file: Path | None = None
) -> LoadedData:
    """Loads a generic interaction log.

    Args:
        path: a ``.parquet``, ``.csv`` or ``.tsv`` file.
        mapping: the columns to use.
        mapping_file: where ``mapping`` was read from, for messages.

    Raises:
        DataLayoutError: the file is not a readable log.
        MappingError: a mapped column is missing from the file.
    """
    path = Path(path)
    frame, refused = read_log(path)
    _check_columns(path, frame, mapping, mapping_file or "the mapping")
    quarantine = Quarantine()
    for line, reason, text in refused:
        quarantine.add(path.name, line, reason, text)
    columns = {"user_id": [], "item_id": [], "rating": [], "click": [], "timestamp": []}
    kept_rows = []
    seen: dict[tuple, tuple] = {}  # (user, item, time) to its line and click
    records = zip(frame.index, frame.to_dict("records"))
    for index, (line, row) in enumerate(records):
        parsed = _parse_row(row, mapping)
        if isinstance(parsed, str):
            quarantine.add(path.name, line, parsed, json.dumps(row, default=str))
            continue
        key = (parsed[0], parsed[1], parsed[4])
        if key in seen:
            first, click = seen[key]
            same = "same user, item and timestamp"
            if parsed[3] != click:
                same += "; its label differs, the first is kept"
            reason = f"duplicate of line {first} ({same})"
            quarantine.add(path.name, line, reason, json.dumps(row, default=str))
            continue
        seen[key] = (line, parsed[3])
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
        rows_in=len(frame) + len(refused),
        source=str(path),
    )


def _check_columns(
    path: Path, frame: pd.DataFrame, mapping: ColumnMapping, where: Path | str
) -> None:
    """Every column the mapping names must be in the file.

    Raises:
        MappingError: one line per field naming a missing column, with the
            file's columns and the fix.
    """
    available = ", ".join(map(str, frame.columns))
    problems = []
    for name, columns in mapping.columns().items():
        for column in columns:
            if column in frame.columns:
                continue
            fix = "remove it or set it" if name.endswith("_features") else "set it"
            problems.append(
                f"{where}: field {name!r}: column {column!r} is not in "
                f"{path.name} (columns: {available}); {fix} to one of them"
            )
    if problems:
        raise MappingError("\n".join(problems))


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
    if isinstance(timestamp, str):
        return f"{mapping.timestamp} {row[mapping.timestamp]!r} {timestamp}"
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


# Epoch numbers from here up are no time in seconds (1e11 s is past the year
# 5000) but in finer units, read as such: 1e11 ms is 1973, as is 1e14 us
# and 1e17 ns.
EPOCH_UNITS = ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3))
BEFORE_1970 = "is before 1970: not the time of a logged event"


def _as_timestamp(value) -> int | str | None:
    """Epoch seconds; a row's reason to be refused (str); or None for a
    value that is neither a number nor a written-out date."""
    # Whole numbers exactly (a float would round nanoseconds), others as float.
    number = _as_int(value) if not isinstance(value, pd.Timestamp) else None
    if number is None and not isinstance(value, pd.Timestamp):
        number = _as_float(value)
    if number is not None:
        if number > INT64_MAX:  # beyond even nanoseconds as int64
            return None
        if number < 0:
            return BEFORE_1970
        for floor, per_second in EPOCH_UNITS:
            if number >= floor:
                return math.floor(number // int(per_second))
        return math.floor(number)
    if isinstance(value, pd.Timestamp):
        seconds = int(value.timestamp())
        return seconds if seconds >= 0 else BEFORE_1970
    text = str(value).strip()
    # pandas also reads words such as "now" and "today", which would make a
    # row's time the moment of ingest: only dates written out are accepted.
    if not text[:4].isdigit():
        return None
    try:
        seconds = int(pd.Timestamp(text).timestamp())
    except (ValueError, TypeError, OverflowError):
        return None
    return seconds if seconds >= 0 else BEFORE_1970


def _latest_known(table: pd.DataFrame, name: str, features: list[str]) -> pd.DataFrame:
    """Each ``name``'s latest value of each feature that is not missing: a
    later empty cell does not erase a value the log gave earlier. Rows are in
    time order; a feature never given stays missing."""
    known = table[features].map(lambda v: None if is_missing(v) else v)
    latest = table[[name]].join(known).groupby(name, sort=False)[features].last()
    return latest.reset_index()[[name, *features]]


def _side_table(kept: pd.DataFrame, key: str, name: str, features: list[str]):
    table = kept[[key, *features]].astype({f: str for f in features})
    table = table.assign(**{name: kept[key].map(_as_int)})
    table = table.drop(columns=[key]) if key != name else table
    return _latest_known(table, name, features)


def _items(kept: pd.DataFrame, mapping: ColumnMapping) -> pd.DataFrame:
    table = _side_table(kept, mapping.item, "item_id", mapping.item_features)
    for feature in mapping.item_features:
        # A missing value is no token (it would otherwise be the token "nan").
        table[feature] = table[feature].map(lambda v: [] if is_missing(v) else [v])
    if mapping.title:
        titles = kept.assign(item_id=kept[mapping.item].map(_as_int))
        titles = _latest_known(titles, "item_id", [mapping.title])
        table = table.merge(
            titles[["item_id", mapping.title]].rename(columns={mapping.title: "title"}),
            on="item_id",
        )
    else:
        table["title"] = table.item_id.map(lambda i: f"item {i}")
    return table
