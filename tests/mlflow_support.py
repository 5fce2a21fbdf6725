"""Real MLflow stores for tests: a migrated SQLite template and a real `mlflow server`.

Registered as a pytest plugin by ``tests/conftest.py``; the fixtures are session-scoped, so each
pytest(-xdist) worker migrates one store and starts at most one server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
}


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch):
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created once: its schema migrations take ~10 s.

    Tests (and the server) work on copies, so each starts from a clean store.
    """
    path = tmp_path_factory.mktemp("template") / "mlruns.db"
    old = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    try:
        MlflowClient(f"sqlite:///{path}").search_experiments()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return path


@pytest.fixture
def store_uri(migrated_db, tmp_path) -> str:
    shutil.copy(migrated_db, tmp_path / "mlruns.db")
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A started `mlflow server` process; :meth:`url` waits until it answers /health."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self._healthy = False

    def url(self, timeout: float = 90.0) -> str:
        base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while not self._healthy:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited ({self.proc.returncode}):\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    self._healthy = resp.status == 200
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server not healthy after {timeout} s:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.5)
        return base

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def start_server(db: Path, port: int, log_path: Path, *extra: str) -> subprocess.Popen:
    """Start ``mlflow server`` on 127.0.0.1:``port`` over the SQLite file ``db`` (one worker,
    quiet, output to ``log_path``) in its own process group; ``extra``: more server flags."""
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *extra,
    ]
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **QUIET_ENV},
            cwd=db.parent,
            start_new_session=True,  # its own process group: a finaliser stops the workers too
        )


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, migrated_db):
    """A real `mlflow server` (SQLite backend, proxied artifacts), started once per session.

    Not autouse: under pytest-xdist every worker would start its own server.
    """
    root = tmp_path_factory.mktemp("mlflow_server")
    shutil.copy(migrated_db, root / "server.db")  # skips the schema migrations at start-up
    port = _free_port()
    log_path = root / "server.log"
    proc = start_server(
        root / "server.db", port, log_path, "--artifacts-destination", str(root / "artifacts")
    )
    try:
        yield _Server(proc, port, log_path)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
