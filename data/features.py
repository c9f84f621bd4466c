"""Turns ids and side features into the integer indices the embedding tables use.

Index 0 of every vocabulary is reserved: padding for item ids, "unknown" for
user ids (a cold user) and for side-feature values never seen in training.
Nothing becomes "unknown" unseen: ingest counts and logs the values that will
(:func:`unknown_values`), and serving refuses them for a new user
(:meth:`FeatureSpace.user_value_problem`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

UNKNOWN = "unknown"
AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"))


# Ages outside this range are no one's age in years (a typo, a birth year).
MAX_AGE = 120


# A decimal number in ASCII digits: Python's float() also reads "3_1" as 31
# and other scripts' digits, which are no age a form sends.
DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def age_bucket(value: str) -> str:
    """MovieLens' age groups; a value that is not a decimal number, or not
    an age in years (below 0 or above ``MAX_AGE``), is unknown."""
    text = str(value).strip()
    if not DECIMAL.fullmatch(text):
        return UNKNOWN
    years = float(text)
    if not 0 <= years <= MAX_AGE:  # NaN and infinities too
        return UNKNOWN
    age = int(years)
    for upper, label in AGE_BUCKETS:
        if age < upper:
            return label
    return "50-55" if age < 56 else "56+"


def zip_prefix(value: str) -> str:
    """The first digit of a US zip code: a coarse region. Other codes share one token."""
    value = str(value).strip()
    return value[0] if value[:1].isdigit() else "other"


TOKENIZERS = {"categorical": str, "age_bucket": age_bucket, "zip_prefix": zip_prefix}
# What a value of a bucketed kind must be.
EXPECTED = {
    "age_bucket": f"an age in years (0 to {MAX_AGE})",
    "zip_prefix": "a zip code",
}
# At most this many known values are listed in a message.
MAX_LISTED = 30


def is_missing(value) -> bool:
    """No value: None, NaN or a blank string (an empty CSV cell)."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    return value is pd.NA or (isinstance(value, str) and not value.strip())


def token(kind: str, value) -> str:
    """The token of a side-feature value; a missing value is unknown."""
    return UNKNOWN if is_missing(value) else TOKENIZERS[kind](str(value))


def unknown_values(
    users: pd.DataFrame,
    items: pd.DataFrame,
    user_features: dict[str, str],
    item_features: list[str],
) -> dict[str, list]:
    """The side-feature values that the model will read as "unknown".

    Args:
        users: ``user_id`` and one column per user feature.
        items: one column per item feature, each value a list of tokens.
        user_features: tokenizer kind per user feature.
        item_features: names of the item features.

    Returns:
        Per feature, as ``user.<name>`` and ``item.<name>``, the raw values of
        the users (or items) that get no known token: missing values, and
        values the tokenizer cannot read (an age that is not a number).
    """
    found = {}
    for name, kind in user_features.items():
        values = users[name].tolist()
        found[f"user.{name}"] = [v for v in values if token(kind, v) == UNKNOWN]
    for name in item_features:
        found[f"item.{name}"] = [None for tokens in items[name] if not len(tokens)]
    return found


@dataclass
class FeatureSpace:
    """Vocabularies of every id and side feature, saved with the model.

    Attributes:
        user_ids: warm users with an id embedding, in index order from 1.
        item_ids: the catalogue, in index order from 1.
        user_features: tokenizer kind per user side feature.
        user_vocab: tokens per user feature, in index order from 1.
        item_vocab: tokens per item feature, in index order from 1.
        item_tokens: per item feature, per item index, its token indices.
    """

    user_ids: list[int]
    item_ids: list[int]
    user_features: dict[str, str]
    user_vocab: dict[str, list[str]]
    item_vocab: dict[str, list[str]]
    item_tokens: dict[str, list[list[int]]]

    def __post_init__(self) -> None:
        self._user_index = {u: i + 1 for i, u in enumerate(self.user_ids)}
        self._item_index = {v: i + 1 for i, v in enumerate(self.item_ids)}
        self._user_token = {
            name: {t: i + 1 for i, t in enumerate(tokens)}
            for name, tokens in self.user_vocab.items()
        }

    @classmethod
    def build(
        cls,
        users: pd.DataFrame,
        items: pd.DataFrame,
        user_features: dict[str, str],
        item_features: list[str],
        id_users: list[int],
    ) -> "FeatureSpace":
        """Builds vocabularies from the user and item tables.

        Args:
            id_users: users that get an id embedding (the warm users).
        """
        user_vocab = {
            name: sorted({token(kind, v) for v in users[name]} - {UNKNOWN})
            for name, kind in user_features.items()
        }
        item_vocab = {
            name: sorted({t for tokens in items[name] for t in tokens})
            for name in item_features
        }
        item_tokens = {}
        for name in item_features:
            index = {t: i + 1 for i, t in enumerate(item_vocab[name])}
            item_tokens[name] = [[index[t] for t in tokens] for tokens in items[name]]
        return cls(
            user_ids=sorted(int(u) for u in id_users),
            item_ids=[int(i) for i in items.item_id],
            user_features=dict(user_features),
            user_vocab=user_vocab,
            item_vocab=item_vocab,
            item_tokens=item_tokens,
        )

    @property
    def num_items(self) -> int:
        """Rows of the item table, padding included."""
        return len(self.item_ids) + 1

    def user_index(self, user_ids) -> np.ndarray:
        return np.array([self._user_index.get(int(u), 0) for u in user_ids], np.int64)

    def item_index(self, item_ids) -> np.ndarray:
        return np.array([self._item_index.get(int(i), 0) for i in item_ids], np.int64)

    def has_item(self, item_id: int) -> bool:
        return int(item_id) in self._item_index

    def encode_user(self, features: dict[str, str]) -> list[int]:
        """Token index per user feature, in ``user_features`` order; 0 if unknown."""
        return [
            self._user_token[name].get(token(kind, features.get(name)), 0)
            for name, kind in self.user_features.items()
        ]

    def user_value_problem(self, name: str, value: str) -> str | None:
        """Why a new user's feature value would be read as unknown, else None.

        A missing value and the word "unknown" itself ask for the unknown
        token, so they are not problems.

        Args:
            name: a user feature of this space.
            value: the value sent.

        Returns:
            ``None`` when the value has a token of its own; otherwise what is
            wrong, the known values and the fix.
        """
        kind = self.user_features[name]
        found = token(kind, value)
        if found in self._user_token[name] or is_missing(value) or value == UNKNOWN:
            return None
        leave_out = f"leave {name} out to serve the user as unknown"
        if kind != "categorical" and found == UNKNOWN:
            return f"{name} {value!r} is not {EXPECTED[kind]}; send one, or {leave_out}"
        known = self.user_vocab[name]
        listed = ", ".join(map(repr, known[:MAX_LISTED]))
        more = f" and {len(known) - MAX_LISTED} more" if len(known) > MAX_LISTED else ""
        if kind == "categorical":
            return (
                f"{name} {value!r} was not seen in training; the known values are "
                f"{listed}{more}. Send one of them, or {leave_out}"
            )
        return (
            f"{name} {value!r} falls in {found!r}, which no training user had "
            f"(known: {listed}{more}); {leave_out}"
        )

    def encode_users(self, users: pd.DataFrame) -> dict[int, list[int]]:
        names = list(self.user_features)
        return {
            int(row["user_id"]): self.encode_user(row)
            for row in users[["user_id", *names]].to_dict("records")
        }

    def save(self, path: Path) -> None:
        fields = (
            "user_ids", "item_ids", "user_features", "user_vocab", "item_vocab",
            "item_tokens",
        )  # fmt: skip
        Path(path).write_text(json.dumps({f: getattr(self, f) for f in fields}))

    @classmethod
    def load(cls, path: Path) -> "FeatureSpace":
        """Reads what :meth:`save` wrote.

        Raises:
            FileNotFoundError: there is no file.
            ValueError: it is not a feature space (cut short, edited),
                naming the file and the fix.
        """
        text = Path(path).read_text()
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"{path} is not a feature space emarec wrote ({type(error).__name__}"
                f"{': ' + reason[:200] if reason else ''}): it was cut short or "
                "edited; write it again with the step that made it (train), or "
                "export the bundle again"
            ) from None
