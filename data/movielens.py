"""Loader for the MovieLens-100K layout (u.data, u.user, u.item).

Every line read is either kept or quarantined with a reason. A file whose first
line does not fit the layout, or most of whose lines are bad, is not MovieLens at
all and stops the load with an error naming the file and line.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from data.schema import (
    CLICK_THRESHOLD,
    DataLayoutError,
    LoadedData,
    Quarantine,
    interactions_frame,
)

logger = logging.getLogger(__name__)

ENCODING = "latin-1"
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
USER_FEATURES = {
    "age": "age_bucket",
    "gender": "categorical",
    "occupation": "categorical",
    "zip": "zip_prefix",
}
# Beyond this share of bad lines a file is taken to be another layout.
MAX_BAD_SHARE = 0.5


def is_movielens_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in ("u.data", "u.user", "u.item"))


def load_movielens(data_dir: Path) -> LoadedData:
    """Loads a MovieLens-100K directory.

    Args:
        data_dir: the folder holding ``u.data``, ``u.user`` and ``u.item``.

    Returns:
        The interactions, users, items and quarantined rows.

    Raises:
        FileNotFoundError: a file of the layout is missing.
        DataLayoutError: a file is not that layout.
    """
    data_dir = Path(data_dir)
    for name in ("u.data", "u.user", "u.item"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(
                f"{data_dir / name} is missing: a MovieLens-100K folder holds "
                "u.data, u.user and u.item (pass --data DIR to point elsewhere)"
            )
    quarantine = Quarantine()
    users = _read_users(data_dir / "u.user", quarantine)
    items = _read_items(data_dir / "u.item", quarantine)
    interactions, rows_in = _read_ratings(
        data_dir / "u.data", set(users.user_id), set(items.item_id), quarantine
    )
    return LoadedData(
        interactions=interactions,
        users=users,
        items=items,
        user_features=dict(USER_FEATURES),
        item_features=["genres"],
        quarantine=quarantine.frame(),
        rows_in=rows_in,
        source=str(data_dir),
    )


def _lines(path: Path, sep: str, n_fields: int, quarantine: Quarantine):
    """Yields (line number, raw, fields) for lines with the right field count."""
    bad, total, first_error = 0, 0, None
    with open(path, encoding=ENCODING, newline="") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip("\r\n")
            if not raw.strip():
                continue
            total += 1
            fields = raw.split(sep)
            if len(fields) != n_fields:
                if total == 1:
                    raise DataLayoutError(
                        path,
                        number,
                        f"expected {n_fields} fields separated by {sep!r}, "
                        f"found {len(fields)}",
                        "Is this a MovieLens-100K file? Otherwise load it as a "
                        "generic interaction log with --mapping",
                    )
                quarantine.add(
                    path.name,
                    number,
                    f"expected {n_fields} fields, found {len(fields)}",
                    raw,
                )
                bad += 1
                first_error = first_error or number
                continue
            yield number, raw, fields
    if total and bad / total > MAX_BAD_SHARE:
        raise DataLayoutError(
            path,
            first_error,
            f"{bad} of {total} lines have the wrong field count",
            "The file is not the MovieLens-100K layout",
        )


def _int(value: str) -> int | None:
    value = value.strip()
    # ASCII digits only: str.isdigit() also accepts "²" (Latin-1) and "--5",
    # which int() then refuses with a ValueError instead of a quarantine.
    if re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    return None


def _read_users(path: Path, quarantine: Quarantine) -> pd.DataFrame:
    rows = []
    seen = set()
    for number, raw, (uid, age, gender, occupation, zip_code) in _lines(
        path, "|", 5, quarantine
    ):
        user_id, age_value = _int(uid), _int(age)
        if user_id is None or user_id < 0:
            reason = f"user id {uid!r} is not a non-negative integer"
        elif age_value is None or not 0 < age_value < 130:
            reason = f"age {age!r} is not an integer between 1 and 129"
        elif user_id in seen:
            reason = f"user {user_id} is listed twice"
        else:
            seen.add(user_id)
            rows.append((user_id, str(age_value), gender, occupation, zip_code))
            continue
        quarantine.add(path.name, number, reason, raw)
    return pd.DataFrame(rows, columns=["user_id", *USER_FEATURES]).astype(
        {"user_id": "int64"}
    )


def _read_items(path: Path, quarantine: Quarantine) -> pd.DataFrame:
    rows = []
    seen = set()
    for number, raw, fields in _lines(path, "|", 5 + len(GENRES), quarantine):
        item_id, flags = _int(fields[0]), fields[5:]
        if item_id is None or item_id < 0:
            reason = f"item id {fields[0]!r} is not a non-negative integer"
        elif any(flag not in ("0", "1") for flag in flags):
            reason = "genre flags must each be 0 or 1"
        elif item_id in seen:
            reason = f"item {item_id} is listed twice"
        else:
            seen.add(item_id)
            genres = [g for g, flag in zip(GENRES, flags) if flag == "1"]
            rows.append((item_id, fields[1], genres))
            continue
        quarantine.add(path.name, number, reason, raw)
    return pd.DataFrame(rows, columns=["item_id", "title", "genres"]).astype(
        {"item_id": "int64"}
    )


def _read_ratings(
    path: Path, user_ids: set[int], item_ids: set[int], quarantine: Quarantine
) -> tuple[pd.DataFrame, int]:
    columns = {"user_id": [], "item_id": [], "rating": [], "click": [], "timestamp": []}
    before = len(quarantine)
    seen: dict[tuple, int] = {}  # (user, item, time) to the line that has it
    for number, raw, (uid, iid, rating, ts) in _lines(path, "\t", 4, quarantine):
        user_id, item_id, rating_value, timestamp = map(_int, (uid, iid, rating, ts))
        if user_id is None or item_id is None or timestamp is None:
            reason = "user id, item id and timestamp must be integers"
        elif rating_value is None or not 1 <= rating_value <= 5:
            reason = f"rating {rating!r} is not an integer from 1 to 5"
        elif user_id not in user_ids:
            reason = f"unknown user {user_id} (not in u.user)"
        elif item_id not in item_ids:
            reason = f"unknown item {item_id} (not in u.item)"
        elif (user_id, item_id, timestamp) in seen:
            first = seen[(user_id, item_id, timestamp)]
            reason = f"duplicate of line {first} (same user, item and timestamp)"
        else:
            seen[(user_id, item_id, timestamp)] = number
            columns["user_id"].append(user_id)
            columns["item_id"].append(item_id)
            columns["rating"].append(float(rating_value))
            columns["click"].append(int(rating_value >= CLICK_THRESHOLD))
            columns["timestamp"].append(timestamp)
            continue
        quarantine.add(path.name, number, reason, raw)
    # Lines with the wrong field count were quarantined inside _lines: count
    # every refusal since this file was opened.
    kept = len(columns["user_id"])
    rows_in = kept + len(quarantine) - before
    logger.info("read %s: %d kept, %d quarantined", path, kept, rows_in - kept)
    return interactions_frame(columns), rows_in
