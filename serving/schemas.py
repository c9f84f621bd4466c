"""Request and response bodies of the serving API.

Limits that depend on settings (batch size, history length, ``k``) are checked
by the handlers; the static ones (types, non-negative ids, non-empty lists)
are declared here so they show in the OpenAPI schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

# Ids are looked up in numpy/torch int64 tables; larger ones could overflow.
MAX_ID = 2**63 - 1

Id = Annotated[int, Field(strict=True, ge=0, le=MAX_ID)]
Rating = Annotated[int, Field(strict=True, ge=1, le=5)]
Cohort = Literal["warm", "cold"]


def _number_as_text(value: object) -> object:
    """A side feature's value as text: ``31`` reads as ``"31"`` (an age
    sent as a JSON number); ``true`` stays what it is, and is refused."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


FeatureValue = Annotated[str, BeforeValidator(_number_as_text)]
FEATURES_DESCRIPTION = (
    "Side features by name, as text (a number, such as an age, may be sent as "
    "a JSON number); missing ones count as unknown. A value the model "
    "has not seen in training (or cannot read, such as an age that is not a "
    "number) is refused with a 422 naming the known values: leave the feature "
    "out to serve the user as unknown."
)

CLICKED_DESCRIPTION = (
    "Whether the new user clicked (liked) each of item_ids, one per item in the "
    "same order. Leave it out when not known: the student then reads the items "
    "alone, which serves new users less well."
)
RATINGS_DESCRIPTION = (
    "The new user's rating (1 to 5) of each of item_ids, one per item in the "
    "same order. A rating says more than a click: send it where the user gave "
    "one. With both ratings and clicked, the ratings are read."
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReloadErrorInfo(BaseModel):
    """Why the latest reload did not serve the registry's champion."""

    model_version: str | None = Field(
        description="The version that failed to load; null if the registry "
        "itself could not be asked."
    )
    message: str
    at: datetime


class HealthResponse(BaseModel):
    """The server is up and serving this model version."""

    status: Literal["ok"] = "ok"
    model_version: str
    last_reload_error: ReloadErrorInfo | None = Field(
        None,
        description="Set while the latest check of the registry alias failed; "
        "the model_version above goes on serving meanwhile.",
    )


class ReloadResponse(BaseModel):
    """The outcome of a forced check of the registry alias."""

    model_version: str = Field(description="The version serving after the check.")
    previous_version: str
    changed: bool
    error: ReloadErrorInfo | None = Field(
        None, description="Why the champion is not serving, if it is not."
    )


class UserEmbeddingResponse(BaseModel):
    """A known user's embedding from the EMA teacher."""

    user_id: int
    embedding: list[float]
    model_version: str
    source: Literal["ema_teacher"] = "ema_teacher"


class ColdUserIn(_Body):
    """A new user: side features and the items they have touched, oldest first."""

    features: dict[str, FeatureValue] = Field(
        default_factory=dict, description=FEATURES_DESCRIPTION
    )
    item_ids: list[Id] = Field(
        min_length=1, description="Items the user touched (1 to max_history)."
    )
    clicked: list[StrictBool] | None = Field(None, description=CLICKED_DESCRIPTION)
    ratings: list[Rating] | None = Field(None, description=RATINGS_DESCRIPTION)


class EmbeddingsRequest(_Body):
    """New users to embed with the INT8 cold-start student (1 to max_batch)."""

    users: list[ColdUserIn] = Field(min_length=1)


class EmbeddingsResponse(BaseModel):
    """One embedding per requested user, in request order."""

    embeddings: list[list[float]]
    model_version: str
    source: Literal["student_int8"] = "student_int8"


class RecommendationRequest(_Body):
    """Who to recommend for: a known user_id, or features and item_ids."""

    user_id: Id | None = Field(
        None,
        description=(
            "A known user is served warm from the EMA teacher and any "
            "features/item_ids are ignored; an unknown one needs item_ids."
        ),
    )
    features: dict[str, FeatureValue] | None = Field(
        None, description=f"A new user's side features. {FEATURES_DESCRIPTION}"
    )
    item_ids: list[Id] | None = Field(
        None,
        min_length=1,
        description="Items a new user touched, oldest first (1 to max_history).",
    )
    clicked: list[StrictBool] | None = Field(None, description=CLICKED_DESCRIPTION)
    ratings: list[Rating] | None = Field(None, description=RATINGS_DESCRIPTION)
    k: int = Field(10, strict=True, ge=1, description="Items wanted (1 to max_k).")


class RecommendedItem(BaseModel):
    """One recommended item, best first."""

    item_id: int
    score: float
    title: str | None


class RecommendationResponse(BaseModel):
    """Recommended items; quote recommendation_id when sending feedback."""

    recommendation_id: str
    cohort: Cohort
    model_version: str
    items: list[RecommendedItem]


class FeedbackRequest(_Body):
    """What the user saw and clicked of one recommendation."""

    recommendation_id: UUID
    impressions: list[Id] | None = Field(
        None,
        description="Items shown; null means every recommended item was shown, "
        "[] that this feedback reports clicks alone.",
    )
    clicks: list[Id] = Field(
        default_factory=list,
        description="Items clicked; each must be shown, in this feedback or an "
        "earlier one.",
    )


class FeedbackResponse(BaseModel):
    """How much of the feedback was new; repeats are counted once."""

    recorded_impressions: int
    recorded_clicks: int
    duplicates: int
