"""Shared fixtures: real servers, the MovieLens data, and an isolated env.

Fixtures:
    mlflow_server      session: a real ``mlflow server`` on 127.0.0.1 (``.uri``)
    mlflow_uri         function: ``mlflow_server.uri``, also set as
                       MLFLOW_TRACKING_URI for the test (and its children)
    ml100k_dir         session: Path to MovieLens-100K; fails if missing
    tmp_airflow_home   function: AIRFLOW_HOME set to a fresh tmp folder
    (autouse)          removes MLFLOW_TRACKING_URI, related MLflow vars and
                       EMAREC_* from each test's env, and restores the env
                       (and MLflow's in-process tracking URI) afterwards
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# MLflow's usage telemetry would call out of the machine; tests stay local.
# Set before anything imports mlflow (and inherited by every child process).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

from tests.servers import MlflowServer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ML100K = REPO_ROOT.parent / "shared" / "datasets" / "ml-100k"
ML100K_FILES = ("u.data", "u.item", "u.user")

# Captured before any test runs, because the autouse fixture below removes
# EMAREC_* from each test's environment.
_ORIGINAL_ENV = dict(os.environ)

# Variables through which one test's MLflow setup would leak into the next.
_MLFLOW_LEAKY_VARS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
)


def _reset_mlflow_globals() -> None:
    """Forget a tracking/registry URI a test set with mlflow.set_*_uri().

    Only touches in-process state; never talks to a server.
    """
    if "mlflow" not in sys.modules:
        return
    import mlflow

    try:
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI
    except Exception:  # pragma: no cover - best effort across mlflow versions
        pass
    try:
        from mlflow.tracking._model_registry import utils as registry_utils

        registry_utils._registry_uri = None
    except Exception:  # pragma: no cover
        pass


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    saved = dict(os.environ)
    for name in list(os.environ):
        if name in _MLFLOW_LEAKY_VARS or name.startswith("EMAREC_"):
            monkeypatch.delenv(name)
    loopback = "127.0.0.1,localhost,::1"
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), loopback]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    yield
    _reset_mlflow_globals()
    # mlflow.set_tracking_uri() and friends write os.environ directly, which
    # monkeypatch does not see: put the environment back exactly.
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking server for the whole session.

    Tests share it, so each should use its own experiment name.
    """
    root = tmp_path_factory.mktemp("mlflow")
    with MlflowServer(root) as server:
        yield server


@pytest.fixture
def mlflow_uri(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session server's URI, also exported as MLFLOW_TRACKING_URI."""
    if not mlflow_server.running:
        pytest.fail(
            f"mlflow server died; last log lines:\n{mlflow_server.process.log_tail()}"
        )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server.uri


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """MovieLens-100K: $EMAREC_DATA if set, else <repo>/../shared/datasets/ml-100k."""
    from_env = _ORIGINAL_ENV.get("EMAREC_DATA")
    path = Path(from_env).expanduser() if from_env else DEFAULT_ML100K
    where = f"EMAREC_DATA={from_env}" if from_env else "the default location"
    if not path.is_dir():
        pytest.fail(
            f"MovieLens-100K not found at {path} ({where}). Put the dataset "
            f"there or set EMAREC_DATA to a folder holding {', '.join(ML100K_FILES)}.",
            pytrace=False,
        )
    missing = [name for name in ML100K_FILES if not (path / name).is_file()]
    if missing:
        pytest.fail(
            f"MovieLens-100K folder {path} ({where}) lacks {', '.join(missing)}.",
            pytrace=False,
        )
    return path.resolve()


@pytest.fixture
def tmp_airflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """AIRFLOW_HOME pointing at a fresh folder (metadata DB, logs, config)."""
    home = tmp_path / "airflow"
    home.mkdir()
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    return home


E2E_MODEL = "emarec-e2e"


@pytest.fixture(scope="session")
def pipeline_run(mlflow_server, ml100k_dir, tmp_path_factory):
    """One short but complete pipeline run on MovieLens-100K, registered in the
    session's MLflow server as ``emarec-e2e``; returns (config, results)."""
    from pipeline.config import PipelineConfig, TrainConfig
    from pipeline.run import run_pipeline

    config = PipelineConfig(
        data=ml100k_dir,
        work_dir=tmp_path_factory.mktemp("e2e") / "run",
        tracking_uri=mlflow_server.uri,
        experiment="e2e-pipeline",
        model_name=E2E_MODEL,
        train=TrainConfig(epochs=1, max_steps=40, student_epochs=0, batch_size=256),
    )
    return config, run_pipeline(config)
