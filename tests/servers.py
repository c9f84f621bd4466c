"""Helpers for tests that run real processes (MLflow, the FastAPI server, CLIs).

Everything here binds and talks to 127.0.0.1 only.

Import from tests as ``from tests.servers import Process, free_port, wait_http``
(pytest puts the repo root on ``sys.path``; see ``pythonpath`` in pyproject).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

LOCALHOST = "127.0.0.1"

# The venv's own executables (mlflow, airflow, emarec, uvicorn, ...), so tests
# never pick up a same-named tool from elsewhere on PATH.
VENV_BIN = Path(sys.executable).parent


def venv_bin(name: str) -> str:
    """Absolute path of an executable installed in the running venv."""
    path = VENV_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed in {VENV_BIN}")
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    There is an unavoidable race between closing the probe socket and the
    server binding it; ``Process`` reports a clear error if that ever bites.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


class ServerStartError(RuntimeError):
    """A process did not become ready; the message carries its log tail."""


def wait_http(
    url: str,
    timeout_s: float = 30.0,
    *,
    status: int = 200,
    interval_s: float = 0.2,
    process: subprocess.Popen | None = None,
) -> httpx.Response:
    """Poll ``url`` with GET until it answers ``status``; return that response.

    Raises ``TimeoutError`` after ``timeout_s``. If ``process`` is given and it
    exits while we wait, raises ``ServerStartError`` at once instead of waiting
    out the timeout.
    """
    deadline = time.monotonic() + timeout_s
    last: str = "no answer yet"
    # trust_env=False: never route loopback traffic through a proxy from env.
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise ServerStartError(
                    f"process exited with status {process.returncode} "
                    f"before {url} answered ({last})"
                )
            try:
                response = client.get(url)
                if response.status_code == status:
                    return response
                last = f"HTTP {response.status_code}: {response.text[:200]!r}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{url} did not answer {status} within {timeout_s:.0f}s ({last})"
                )
            time.sleep(interval_s)


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Process:
    """A subprocess whose output goes to a log file, stopped for sure on exit.

    ``with Process([...], log_path=..., ready_url=...) as proc:`` starts the
    command in its own session (process group), waits until ``ready_url``
    answers 200 if one is given, and on leaving the block sends SIGTERM to the
    whole group, waits ``stop_timeout_s``, then SIGKILLs whatever is left.
    The group matters: ``mlflow server`` and ``emarec demo`` run their real
    server as a child process.

    If the process dies or never gets ready, it is stopped and
    ``ServerStartError`` is raised with the tail of its log.
    """

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        log_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready_url: str | None = None,
        ready_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        name: str | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready_url = ready_url
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.name = name or Path(self.args[0]).name
        self.popen: subprocess.Popen | None = None
        self._log_file = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Process:
        if self.popen is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # closed in stop()
        self._log_file.write(f"$ {' '.join(self.args)}\n".encode())
        self._log_file.flush()
        try:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise ServerStartError(f"could not start {self.name}: {exc}") from exc
        if self.ready_url is not None:
            try:
                wait_http(self.ready_url, self.ready_timeout_s, process=self.popen)
            except (TimeoutError, ServerStartError) as exc:
                self.stop()
                raise ServerStartError(
                    f"{self.name} did not start: {exc}\n"
                    f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
                ) from None
        return self

    def stop(self) -> int | None:
        """Stop the process group; return the main process's exit status."""
        popen = self.popen
        if popen is None:
            return None
        try:
            if popen.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    popen.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    popen.wait(timeout=self.stop_timeout_s)
            # The leader may have gone while children (e.g. uvicorn under
            # `mlflow server`) linger: give them a moment, then kill them.
            if self._group_alive():
                self._signal_group(signal.SIGTERM)
                deadline = time.monotonic() + self.stop_timeout_s
                while self._group_alive() and time.monotonic() < deadline:
                    time.sleep(0.1)
                if self._group_alive():
                    self._signal_group(signal.SIGKILL)
        finally:
            self._close_log()
        return popen.returncode

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection --------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def log_tail(self, lines: int = 60) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        return tail(self.log_path, lines)

    # -- internals ---------------------------------------------------------

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        try:
            # start_new_session=True made the child a group leader: its pgid
            # is its pid, and the group holds only what it spawned.
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _group_alive(self) -> bool:
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def child_env(
    extra: Mapping[str, str] | None = None, **overrides: str
) -> dict[str, str]:
    """A copy of the current environment for a child process.

    Loopback never goes through a proxy, MLflow telemetry is off, and
    ``extra``/``overrides`` are applied last.
    """
    env = dict(os.environ)
    # No usage telemetry from MLflow: nothing leaves the machine.
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "true")
    no_proxy = ",".join(
        filter(None, [env.get("NO_PROXY", ""), "127.0.0.1,localhost,::1"])
    )
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    if extra:
        env.update(extra)
    env.update(overrides)
    return env


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store under ``root``.

    Artifacts are proxied by the server (``--serve-artifacts``, the default in
    MLflow 3) into ``root/artifacts``, so clients only ever need ``.uri``.
    Use as a context manager, or through the ``mlflow_server`` fixture.
    """

    def __init__(
        self, root: Path, *, port: int | None = None, ready_timeout_s: float = 120.0
    ) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://{LOCALHOST}:{self.port}"
        self.backend_store_uri = f"sqlite:///{(self.root / 'mlflow.db').resolve()}"
        self.artifacts_dir = (self.root / "artifacts").resolve()
        self.log_path = self.root / "mlflow-server.log"
        # Host headers a client may send. MLflow 3's security middleware
        # already allows localhost/127.0.0.1 by default, but an inherited
        # MLFLOW_SERVER_ALLOWED_HOSTS would replace that default, so say it.
        allowed_hosts = ",".join(
            f"{h}{p}" for h in (LOCALHOST, "localhost") for p in ("", f":{self.port}")
        )
        env = child_env()
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(name, None)
        self.process = Process(
            [
                venv_bin("mlflow"),
                "server",
                "--backend-store-uri",
                self.backend_store_uri,
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.artifacts_dir),
                "--host",
                LOCALHOST,
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--allowed-hosts",
                allowed_hosts,
            ],
            log_path=self.log_path,
            env=env,
            cwd=self.root,
            ready_url=f"{self.uri}/health",
            ready_timeout_s=ready_timeout_s,
            name="mlflow server",
        )

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    @property
    def running(self) -> bool:
        return self.process.running

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MlflowServer(uri={self.uri!r}, root={str(self.root)!r})"
