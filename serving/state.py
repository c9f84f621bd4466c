"""What the handlers share while the app runs, and the dependencies that hand it
out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from models.bundle import Predictor
from serving.config import ServingSettings
from serving.middleware import stamp_model_version
from serving.recommendations import RecommendationLog
from serving.reporter import ServingReporter
from serving.reporters import ReporterPool
from serving.watcher import ModelWatcher, ServedModel


@dataclass(frozen=True)
class ServingState:
    """Everything the handlers share, built by the app's lifespan."""

    settings: ServingSettings
    watcher: ModelWatcher
    reporters: ReporterPool
    recommendations: RecommendationLog

    @property
    def predictor(self) -> Predictor:
        """The model serving now."""
        return self.watcher.current.predictor

    @property
    def reporter(self) -> ServingReporter:
        """The reporter of the version serving now."""
        return self.reporters.get(self.watcher.current.version)


def serving_state(request: Request) -> ServingState:
    """The app's shared state, for handlers that take no dependencies."""
    return request.app.state.serving


def take_model(request: Request, state: ServingState) -> ServedModel:
    """The model for this request, taken once: a swap while it runs does not
    change it, and its version goes into the response's header.

    Args:
        request: the request being handled.
        state: the app's shared state.

    Returns:
        The model serving now.
    """
    served = state.watcher.current
    stamp_model_version(request, served.version)
    return served


# Async so resolving them never waits for a threadpool slot.
async def _state(request: Request) -> ServingState:
    return serving_state(request)


State = Annotated[ServingState, Depends(_state)]


async def _model(request: Request, state: State) -> ServedModel:
    return take_model(request, state)


Model = Annotated[ServedModel, Depends(_model)]
