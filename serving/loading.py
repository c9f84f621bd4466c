"""Where served models come from: the registry alias, a local bundle, a loader.

A source answers two questions: which version should serve now (cheap, asked
on every poll) and what that version's predictor is (slow: download and load).
Loading reads JSON, parquet tables and ``torch.load(weights_only=True)``
tensors only; the registered pyfunc wrapper, which would run code, is never
loaded.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

from models.bundle import Predictor, load_bundle
from serving.config import ServingSettings
from serving.registry import (
    LOCAL_VERSION,
    ModelRef,
    champion_ref,
    download_bundle,
    find_bundle_dir,
)

logger = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    """A predictor and the training run it came from (``None`` if unknown)."""

    predictor: Predictor
    run_id: str | None = None


PredictorLoader = Callable[[ServingSettings], LoadedModel]


class ModelSource(Protocol):
    """What the watcher needs to follow a model over time.

    Attributes:
        follows: whether the version to serve can change, so polling helps.
    """

    follows: bool

    def champion(self) -> ModelRef:
        """The version that should serve now."""
        ...

    def load(self, ref: ModelRef) -> Predictor:
        """Load one version; raises on a missing or corrupt artifact."""
        ...


class RegistrySource:
    """The version under the settings' alias in the MLflow registry."""

    follows = True

    def __init__(self, settings: ServingSettings) -> None:
        """Remember where the registry is.

        Args:
            settings: tracking URI, model name and alias.
        """
        self._settings = settings

    def champion(self) -> ModelRef:
        """Ask the registry which version holds the alias.

        Returns:
            The version and its training run.
        """
        return champion_ref(self._settings)

    def load(self, ref: ModelRef) -> Predictor:
        """Download a version into a temporary folder and load it into memory.

        The folder is removed afterwards: a bundle reads every file when it
        is built, so nothing on disk is needed while it serves.

        Args:
            ref: the version to load.

        Returns:
            The loaded bundle, its ``version`` set to ``ref.version``.
        """
        with tempfile.TemporaryDirectory(prefix="emarec-model-") as tmp:
            path = download_bundle(self._settings, ref.version, Path(tmp))
            logger.info("loading version %s from %s", ref.version, path)
            return load_bundle(path, ref.version)


class LocalSource:
    """A bundle folder on disk, served as version ``local``; it never changes."""

    follows = False

    def __init__(self, model_dir: Path) -> None:
        """Remember the folder.

        Args:
            model_dir: an exported bundle, or a folder holding one.
        """
        self._model_dir = Path(model_dir)

    def champion(self) -> ModelRef:
        """Always the local version, without a training run."""
        return ModelRef(LOCAL_VERSION)

    def load(self, ref: ModelRef) -> Predictor:
        """Load the bundle under the folder.

        Args:
            ref: the local version.

        Returns:
            The loaded bundle.
        """
        path = find_bundle_dir(self._model_dir)
        logger.info("serving local bundle from %s", path)
        return load_bundle(path, ref.version)


class LoaderSource:
    """A model from a loader function, loaded once and never changed."""

    follows = False

    def __init__(self, loader: PredictorLoader, settings: ServingSettings) -> None:
        """Wrap a loader.

        Args:
            loader: returns the model to serve.
            settings: passed to the loader.
        """
        self._loader = loader
        self._settings = settings
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()

    def champion(self) -> ModelRef:
        """The loaded model's version, loading it on the first call."""
        loaded = self._get()
        return ModelRef(str(loaded.predictor.version), loaded.run_id)

    def load(self, ref: ModelRef) -> Predictor:
        """The loaded predictor, whatever ``ref`` says."""
        return self._get().predictor

    def _get(self) -> LoadedModel:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._loader(self._settings)
            return self._loaded


def source_from_settings(settings: ServingSettings) -> ModelSource:
    """The source the settings name: ``model_dir`` wins over the registry.

    Args:
        settings: serving settings.

    Returns:
        A local or a registry source.
    """
    if settings.model_dir is not None:
        return LocalSource(settings.model_dir)
    return RegistrySource(settings)
