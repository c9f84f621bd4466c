"""Find the model bundle to serve: a local directory or the registry champion."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from serving.config import ServingSettings

logger = logging.getLogger(__name__)

BUNDLE_MARKER = "bundle.json"
LOCAL_VERSION = "local"


def _is_missing(exc: MlflowException) -> bool:
    """Whether the registry said the model or its alias does not exist."""
    if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
        return True
    # MLflow reports a missing alias as a bad parameter, not a missing resource.
    return (
        exc.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
        and "not found" in exc.message.lower()
    )


def resolve_model(settings: ServingSettings) -> tuple[Path, str, str | None]:
    """Locate the bundle directory to load.

    Args:
        settings: serving settings; ``model_dir`` wins over the registry.

    Returns:
        ``(bundle_dir, model_version, training_run_id)``; a local directory has
        version ``"local"`` and no run id.

    Raises:
        RuntimeError: the registry has no version under the alias, or the
            downloaded files hold no ``bundle.json``.
    """
    if settings.model_dir is not None:
        logger.info("serving local bundle from %s", settings.model_dir)
        return find_bundle_dir(settings.model_dir), LOCAL_VERSION, None
    return _resolve_registered(settings)


@dataclass(frozen=True)
class ModelRef:
    """One registered model version.

    Attributes:
        version: the registry's version number, as text.
        run_id: the training run that logged it, if known.
    """

    version: str
    run_id: str | None = None


def _client(settings: ServingSettings) -> mlflow.MlflowClient:
    uri = settings.tracking_uri
    # The registry lives on the tracking server in this project; passing it
    # explicitly keeps a stray MLFLOW_REGISTRY_URI from pointing elsewhere.
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion_ref(settings: ServingSettings) -> ModelRef:
    """Ask the registry which version holds the alias now.

    Args:
        settings: serving settings (tracking URI, model name and alias).

    Returns:
        The version under the alias and its training run.

    Raises:
        RuntimeError: no version has the alias, or the model does not exist.
        MlflowException: the registry could not be asked.
    """
    name, alias, uri = settings.model_name, settings.model_alias, settings.tracking_uri
    try:
        model_version = _client(settings).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        raise RuntimeError(
            f"no model version of {name!r} has the alias {alias!r} at {uri}: no "
            "champion exists yet; run `emarec run` first to train and register one"
        ) from exc
    return ModelRef(str(model_version.version), model_version.run_id)


def download_bundle(
    settings: ServingSettings, version: str, dst: Path | None = None
) -> Path:
    """Download one registered version's files and find its bundle in them.

    Only files are fetched; nothing is unpickled or run (the pyfunc wrapper
    is never loaded).

    Args:
        settings: serving settings (tracking URI, model name).
        version: the registry version to fetch.
        dst: folder to download into; MLflow picks a temporary one if ``None``.

    Returns:
        The directory that holds ``bundle.json``.

    Raises:
        RuntimeError: the downloaded files hold no ``bundle.json``.
        MlflowException: the download failed.
    """
    uri = settings.tracking_uri
    # Ask this client for the files' location instead of downloading
    # "models:/name@alias": MLflow resolves a models:/ URI with the global
    # registry URI, ignoring the one passed in. Pinning the version also keeps
    # a concurrent promotion from handing us another version's files.
    source = _client(settings).get_model_version_download_uri(
        settings.model_name, version
    )
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri=source,
        dst_path=None if dst is None else str(dst),
        tracking_uri=uri,
        registry_uri=uri,
    )
    return find_bundle_dir(Path(downloaded))


def _resolve_registered(settings: ServingSettings) -> tuple[Path, str, str | None]:
    ref = champion_ref(settings)
    path = download_bundle(settings, ref.version)
    logger.info(
        "resolved %s@%s to version %s (training run %s)",
        settings.model_name,
        settings.model_alias,
        ref.version,
        ref.run_id,
    )
    return path, ref.version, ref.run_id


def find_bundle_dir(root: Path) -> Path:
    """Find the directory holding ``bundle.json`` at or below ``root``.

    A registered pyfunc model keeps its bundle under ``artifacts/bundle``; the
    search tolerates other layouts and prefers the shallowest match.

    Args:
        root: a bundle directory or a downloaded model directory.

    Returns:
        The directory that contains ``bundle.json``.

    Raises:
        RuntimeError: no ``bundle.json`` exists under ``root``.
    """
    if (root / BUNDLE_MARKER).is_file():
        return root
    matches = sorted(
        root.rglob(BUNDLE_MARKER), key=lambda path: (len(path.parts), str(path))
    )
    if not matches:
        raise RuntimeError(
            f"no {BUNDLE_MARKER} under {root}; it is not an exported emarec bundle"
        )
    if len(matches) > 1:
        logger.warning(
            "%d bundles under %s, serving the shallowest: %s",
            len(matches),
            root,
            matches[0].parent,
        )
    return matches[0].parent
