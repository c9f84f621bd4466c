"""The HTTP API: embeddings and recommendations for known and new users.

Known (warm) users are served from the EMA teacher, new (cold) users from the
INT8 student. Handlers that call the model are plain ``def`` functions, so
FastAPI runs the blocking model calls in its threadpool, off the event loop.
The known-user embedding is the exception: it is a row of a table the model
computed when it was loaded, so its handler is ``async`` and skips the
threadpool hop.

The model follows the registry alias (:mod:`serving.watcher`): each request
takes the serving model once and answers with its version, in the body's
``model_version`` and the ``X-Model-Version`` header.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from models.bundle import ColdUser, Predictor, Scored
from serving import admin, memory
from serving.config import ServingSettings
from serving.loading import (
    LoadedModel,
    LoaderSource,
    ModelSource,
    PredictorLoader,
    source_from_settings,
)
from serving.middleware import BodySizeLimit, ModelVersionHeader, stamp_model_version
from serving.recommendations import RecommendationLog
from serving.reporter import ServingReporter
from serving.reporters import ReporterFactory, ReporterPool
from serving.schemas import (
    MAX_ID,
    ColdUserIn,
    EmbeddingsRequest,
    EmbeddingsResponse,
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    RecommendationRequest,
    RecommendationResponse,
    RecommendedItem,
    UserEmbeddingResponse,
)
from serving.state import Model, ServingState, State, serving_state, take_model
from serving.watcher import ModelWatcher, ServedModel

__all__ = [
    "LoadedModel",
    "ModelSource",
    "NoModelToServe",
    "PredictorLoader",
    "ReporterFactory",
    "ServingState",
    "create_app",
]

logger = logging.getLogger(__name__)

# A 422 error: location under the body, message, offending input.
_Error = tuple[tuple[Any, ...], str, Any]


class NoModelToServe(RuntimeError):
    """Start-up found no model to serve; the log has said why, in a line."""


def create_app(
    settings: ServingSettings | None = None,
    predictor_loader: PredictorLoader | None = None,
    *,
    reporter_factory: ReporterFactory | None = None,
    source: ModelSource | None = None,
) -> FastAPI:
    """Build the serving app; the model is loaded when the app starts.

    Args:
        settings: serving settings; read from the environment when ``None``.
        predictor_loader: returns one fixed model to serve; it is never
            reloaded. Ignored when ``source`` is given.
        reporter_factory: builds a version's metrics reporter from settings,
            model version and training run id; defaults to
            :meth:`ServingReporter.from_settings`.
        source: where versions come from and which one should serve; defaults
            to ``predictor_loader``, else the settings' local bundle or
            registry alias.

    Returns:
        The FastAPI app; its state is ``app.state.serving`` while running.
    """
    settings = ServingSettings() if settings is None else settings
    if source is None:
        source = (
            source_from_settings(settings)
            if predictor_loader is None
            else LoaderSource(predictor_loader, settings)
        )
    make_reporter = reporter_factory or ServingReporter.from_settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reporters = ReporterPool(settings, make_reporter)
        watcher = _watcher(settings, source, reporters)
        try:
            await run_in_threadpool(watcher.start_serving)
        except Exception as exc:
            logger.error("no loadable model to serve, not starting: %s", exc)
            raise NoModelToServe(str(exc)) from exc
        log = RecommendationLog(
            settings.recommendation_cache, settings.recommendation_cache_items
        )
        app.state.serving = ServingState(settings, watcher, reporters, log)
        if source.follows:
            watcher.start()
        trimmer = None
        if settings.malloc_trim_interval_s > 0:
            frozen = memory.freeze_startup()
            logger.info("%d start-up objects frozen out of garbage collection", frozen)
            trimmer = memory.Trimmer(settings.malloc_trim_interval_s).start()
        try:
            yield
        finally:
            if trimmer is not None:
                trimmer.stop()
                memory.unfreeze()
            await run_in_threadpool(watcher.stop)
            await run_in_threadpool(reporters.stop)
            logger.info("serving stopped")

    app = FastAPI(
        title="emarec",
        summary="Embeddings and recommendations for known and new users.",
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(admin.router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Added last, so it runs first: nothing reads an oversized body.
    app.add_middleware(ModelVersionHeader)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app


def _watcher(
    settings: ServingSettings, source: ModelSource, reporters: ReporterPool
) -> ModelWatcher:
    def on_swap(served: ServedModel, evicted: list[str]) -> None:
        reporters.serve(served.version, served.run_id, evicted)
        if evicted and settings.malloc_trim_interval_s > 0:
            # A frozen model left behind is only freed once it is collectable.
            memory.refreeze()

    return ModelWatcher(
        source,
        cache_size=settings.model_cache,
        poll_interval_s=settings.poll_interval_s,
        on_swap=on_swap,
    )


async def _validation_error(
    request: Request, exc: RequestValidationError
) -> JSONResponse:
    """FastAPI's 422 body, made safe for inputs such as ``NaN``.

    Python's JSON parser accepts ``NaN`` and ``Infinity``, and FastAPI's own
    handler echoes the input back, which strict JSON cannot encode (a 500).
    """
    errors = _finite(jsonable_encoder(exc.errors()))
    return JSONResponse(status_code=422, content={"detail": errors})


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


router = APIRouter()


@contextmanager
def _timed(state: ServingState, version: str, endpoint: str) -> Iterator[None]:
    """Record the handler's wall time for the serving version, failures too."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        state.reporters.record_latency(version, endpoint, elapsed)


def _invalid(errors: list[_Error]) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own validation errors."""
    return RequestValidationError(
        [
            {"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}
            for loc, msg, value in errors
        ]
    )


def _cold_user_errors(
    state: ServingState,
    predictor: Predictor,
    features: dict[str, str],
    user: ColdUserIn | RecommendationRequest,
    loc: tuple,
) -> list[_Error]:
    """Check a new user's features, items, clicks and ratings against the model."""
    errors = _feature_errors(predictor, features, loc)
    item_ids = user.item_ids
    for name in ("clicked", "ratings"):
        answers = getattr(user, name)
        if answers is not None and len(answers) != len(item_ids):
            msg = (
                f"{name} holds {len(answers)} values for {len(item_ids)} item_ids; "
                f"send one per item, in the same order, or leave {name} out"
            )
            errors.append(((*loc, name), msg, len(answers)))
    max_history = state.settings.max_history
    if len(item_ids) > max_history:
        msg = f"item_ids holds {len(item_ids)} items; send at most {max_history}"
        errors.append(((*loc, "item_ids"), msg, len(item_ids)))
        return errors
    unknown = sorted({i for i in item_ids if not predictor.has_item(i)})
    if unknown:
        msg = f"unknown item ids {unknown}; they are not in the catalogue"
        errors.append(((*loc, "item_ids"), msg, unknown))
    return errors


def _feature_errors(
    predictor: Predictor, features: dict[str, str], loc: tuple
) -> list[_Error]:
    """Unknown feature names, and values the model would read as unknown.

    A value the model never saw would silently be served as "unknown"; it is
    refused instead, naming the known values, so the client either fixes it
    or leaves the feature out on purpose.
    """
    known = predictor.user_feature_names
    errors: list[_Error] = []
    for name, value in features.items():
        where = (*loc, "features", name)
        if name not in known:
            msg = f"unknown user feature {name!r}; expected one of {list(known)}"
            errors.append((where, msg, name))
        elif problem := predictor.user_feature_problem(name, value):
            errors.append((where, problem, value))
    return errors


def _check_max(field: str, value: int, limit: int, what: str) -> None:
    if value > limit:
        msg = f"{what} is {value}; this server allows at most {limit}"
        raise _invalid([((field,), msg, value)])


# Async on purpose: it does no blocking work, and must answer even while the
# threadpool is busy with model calls.
@router.get("/healthz", response_model=HealthResponse)
async def healthz(state: State) -> HealthResponse:
    """Liveness check naming the model version being served, and the latest
    reload error while the registry's champion could not be loaded."""
    return HealthResponse(
        model_version=state.watcher.current.version,
        last_reload_error=admin.error_info(state.watcher.last_error),
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    """Impressions, clicks and latency in Prometheus' text format."""
    body, content_type = state.reporters.prometheus.text()
    return Response(body, media_type=content_type)


# Async on purpose: known users' embeddings are computed when the model is
# loaded, so this is a memory read; a threadpool hop would cost more than it.
# The hottest route, so it takes the request instead of the State and Model
# dependencies: resolving them costs about as much as the handler itself.
@router.get("/v1/users/{user_id}/embedding", response_model=UserEmbeddingResponse)
async def user_embedding(
    user_id: Annotated[int, PathParam(ge=0, le=MAX_ID)], request: Request
) -> UserEmbeddingResponse:
    """Embedding of a known user from the EMA teacher."""
    state = serving_state(request)
    model = take_model(request, state)
    with _timed(state, model.version, "embedding"):
        predictor = model.predictor
        if not predictor.has_user(user_id):
            raise HTTPException(
                404,
                f"unknown user {user_id}; use POST /v1/embeddings with the user's "
                "features and item_ids for new users",
            )
        embedding = predictor.user_embeddings([user_id])[0]
        logger.debug("embedding for user %d", user_id)
        return UserEmbeddingResponse(
            user_id=user_id, embedding=embedding.tolist(), model_version=model.version
        )


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
def cold_embeddings(
    body: EmbeddingsRequest, state: State, model: Model
) -> EmbeddingsResponse:
    """Embeddings of new users from the INT8 cold-start student."""
    with _timed(state, model.version, "embeddings"):
        max_batch = state.settings.max_batch
        _check_max("users", len(body.users), max_batch, "the number of users")
        errors: list[_Error] = []
        for index, user in enumerate(body.users):
            loc = ("users", index)
            errors += _cold_user_errors(
                state, model.predictor, user.features, user, loc
            )
        if errors:
            raise _invalid(errors)
        users = [_to_cold_user(user.features, user) for user in body.users]
        embeddings = model.predictor.cold_embeddings(users)
        logger.debug("cold embeddings for %d users", len(users))
        return EmbeddingsResponse(
            embeddings=embeddings.tolist(), model_version=model.version
        )


def _to_cold_user(
    features: dict[str, str] | None, user: ColdUserIn | RecommendationRequest
) -> ColdUser:
    return ColdUser(
        features=dict(features or {}),
        item_ids=tuple(user.item_ids),
        clicked=None if user.clicked is None else tuple(user.clicked),
        ratings=None if user.ratings is None else tuple(user.ratings),
    )


@router.post("/v1/recommendations", response_model=RecommendationResponse)
def recommendations(
    body: RecommendationRequest, state: State, model: Model
) -> RecommendationResponse:
    """Top-k unseen items for a known user (warm) or a new one (cold)."""
    with _timed(state, model.version, "recommendations"):
        _check_max("k", body.k, state.settings.max_k, "k")
        cohort, scored = _recommend(body, state, model.predictor)
        item_ids = [int(s.item_id) for s in scored]
        stored = state.recommendations.add(cohort, model.version, item_ids)
        logger.debug("%s recommendation %s", cohort, stored.recommendation_id)
        return RecommendationResponse(
            recommendation_id=stored.recommendation_id,
            cohort=cohort,
            model_version=model.version,
            items=[
                RecommendedItem(
                    item_id=item_id,
                    score=float(s.score),
                    title=model.predictor.item_title(item_id),
                )
                for item_id, s in zip(item_ids, scored, strict=True)
            ],
        )


def _recommend(
    body: RecommendationRequest, state: ServingState, predictor: Predictor
) -> tuple[str, list[Scored]]:
    """Pick the cohort and ask the model; raises 404/422 for unusable input."""
    if body.user_id is not None and predictor.has_user(body.user_id):
        return "warm", predictor.recommend_known(body.user_id, body.k)
    if body.item_ids is None:
        if body.user_id is not None:
            raise HTTPException(
                404,
                f"unknown user {body.user_id}; send item_ids (and features) to get "
                "cold-start recommendations for a new user",
            )
        raise _invalid(
            [
                (
                    ("item_ids",),
                    "send the user_id of a known user, or item_ids (and "
                    "optionally features) for a new user",
                    None,
                )
            ]
        )
    features = body.features or {}
    errors = _cold_user_errors(state, predictor, features, body, ())
    if errors:
        raise _invalid(errors)
    cold = _to_cold_user(features, body)
    return "cold", predictor.recommend_cold(cold, body.k)


@router.post("/v1/feedback", response_model=FeedbackResponse)
def feedback(body: FeedbackRequest, request: Request, state: State) -> FeedbackResponse:
    """Record impressions and clicks of a recommendation, each counted once.

    The counts go to the model version that made the recommendation (its
    ``X-Model-Version``), even if another version serves by now.
    """
    with _timed(state, state.watcher.current.version, "feedback"):
        recommendation_id = str(body.recommendation_id)
        stored = state.recommendations.get(recommendation_id)
        if stored is None:
            raise _unknown_recommendation(recommendation_id, state)
        stamp_model_version(request, stored.model_version)
        shown = stored.item_ids if body.impressions is None else body.impressions
        _check_feedback(stored.item_ids, shown, body.clicks, stored.impressed)
        try:
            outcome = state.recommendations.record(
                recommendation_id, list(shown), body.clicks
            )
        except KeyError:
            raise _unknown_recommendation(recommendation_id, state) from None
        state.reporters.record_feedback(
            stored.model_version,
            stored.cohort,
            outcome.new_impressions,
            outcome.new_clicks,
        )
        logger.debug("feedback for %s: %s", recommendation_id, outcome)
        return FeedbackResponse(
            recorded_impressions=outcome.new_impressions,
            recorded_clicks=outcome.new_clicks,
            duplicates=outcome.duplicates,
        )


def _unknown_recommendation(
    recommendation_id: str, state: ServingState
) -> HTTPException:
    return HTTPException(
        404,
        f"unknown or expired recommendation_id {recommendation_id}; feedback is "
        f"kept for the last {state.recommendations.capacity} recommendations "
        f"or {state.recommendations.item_capacity} recommended items, whichever "
        "are fewer",
    )


def _check_feedback(
    recommended: tuple[int, ...],
    shown: tuple[int, ...] | list[int],
    clicks: list[int],
    shown_before: frozenset[int] = frozenset(),
) -> None:
    """Feedback may only name recommended items, and clicks must be shown, in
    this feedback or in an earlier one (a late click comes alone, with
    ``"impressions": []``)."""
    errors: list[_Error] = []
    not_recommended = sorted(set(shown) - set(recommended))
    if not_recommended:
        msg = f"impressions {not_recommended} were not in this recommendation"
        errors.append((("impressions",), msg, not_recommended))
    not_shown = sorted(set(clicks) - set(shown) - shown_before)
    if not_shown:
        label = "not in this recommendation"
        if set(not_shown) <= set(recommended):
            label = "not among the impressions, of this feedback or an earlier one"
        msg = f"clicks {not_shown} were {label}"
        errors.append((("clicks",), msg, not_shown))
    if errors:
        raise _invalid(errors)
