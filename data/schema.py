"""Column layout shared by every loader, and the result a loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

# One row per interaction. `rating` is NaN for logs that carry clicks only.
INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("rating", pa.float32()),
        pa.field("click", pa.int8(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("line", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
    ]
)

# A rating at or above this counts as a click.
CLICK_THRESHOLD = 4.0


class DataLayoutError(ValueError):
    """A file is not the layout its loader expects at all."""

    def __init__(self, path: Path | str, line: int, problem: str, fix: str):
        self.path, self.line = Path(path), line
        super().__init__(f"{path}, line {line}: {problem}. {fix}")


@dataclass
class Quarantine:
    """Rows refused by a loader, each with the reason; nothing is dropped silently."""

    rows: list[dict] = field(default_factory=list)

    def add(self, source: str, line: int, reason: str, raw: str) -> None:
        self.rows.append({"source": source, "line": line, "reason": reason, "raw": raw})

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self) -> pd.DataFrame:
        table = pa.Table.from_pylist(self.rows, schema=QUARANTINE_SCHEMA)
        return table.to_pandas()


@dataclass
class LoadedData:
    """What every loader returns.

    Attributes:
        interactions: columns of ``INTERACTIONS_SCHEMA``.
        users: ``user_id`` plus one string column per user side feature.
        items: ``item_id``, ``title`` and one column per item feature, each value
            a list of strings (genres are multi-valued).
        user_features: how each user side-feature column becomes a token, by
            name: ``"categorical"``, ``"age_bucket"`` or ``"zip_prefix"``.
        item_features: names of the item feature columns.
        quarantine: rows refused, with reasons.
        rows_in: interaction rows read, ``rows_kept + rows_quarantined``.
    """

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_features: dict[str, str]
    item_features: list[str]
    quarantine: pd.DataFrame
    rows_in: int
    source: str

    @property
    def rows_kept(self) -> int:
        return len(self.interactions)

    @property
    def rows_quarantined(self) -> int:
        return self.rows_in - self.rows_kept


def interactions_frame(rows: dict[str, list]) -> pd.DataFrame:
    """Builds an interactions frame with the explicit schema."""
    table = pa.Table.from_pydict(rows, schema=INTERACTIONS_SCHEMA)
    return table.to_pandas()
