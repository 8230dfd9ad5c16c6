"""A real MLflow tracking server on loopback for tests and benchmarks.

`MlflowServer` starts ``mlflow server`` (sqlite store, local artifact root, one worker) as a
subprocess, waits for ``/health`` with a bound, and can be stopped and restarted on the same port
and database. The ``mlflow_server`` fixture shares one server per test session.

    # in a test module
    pytest_plugins = ["fixtures_mlflow"]

    def test_x(mlflow_server):
        client = MlflowClient(tracking_uri=mlflow_server.url)
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One ``mlflow server`` subprocess bound to 127.0.0.1.

    Args:
      root: directory holding ``mlflow.db``, ``artifacts/`` and ``server.log``.
      port: port to listen on (default a free one).
      start_timeout_s: longest wait for ``/health`` before `start` fails.
    """

    def __init__(self, root: str | os.PathLike[str], *, port: int | None = None, start_timeout_s: float = 90.0) -> None:
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        """Starts the server and returns once ``/health`` answers.

        Raises:
          RuntimeError: the server exited or did not answer within ``start_timeout_s`` (log tail attached).
        """
        log = open(self.root / "server.log", "ab")
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--default-artifact-root", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(
            f"mlflow server on port {self.port} did not become healthy in {self.start_timeout_s:g} s:\n{tail}"
        )

    def stop(self) -> None:
        """Stops the server and its workers (the whole process group we started)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)
        self.process = None
        # Wait until the port is really free so a restart on it succeeds.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


@pytest.fixture(scope="session")
def mlflow_server():
    """One real MLflow server for the whole session (started on first use, killed at teardown)."""
    root = tempfile.mkdtemp(prefix="tracker-eval-mlflow-")
    server = MlflowServer(root).start()
    try:
        yield server
    finally:
        server.stop()
