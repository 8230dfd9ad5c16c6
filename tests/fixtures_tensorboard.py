"""A real ``tensorboard`` server on loopback, started on a free port and stopped with its data server.

The default loader (``--load_fast=auto``) runs TensorBoard's Rust data server as a child process;
the whole process group is stopped, so nothing is left behind.

    with TensorboardServer(logdir) as server:
        server.json("/data/plugin/scalars/tags")              # {run: {tag: {...}}}
        server.scalar_steps("eval", "eval/loss")              # [100, 200, ...] or None (not loaded yet)
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

EXE = str(pathlib.Path(sys.executable).with_name("tensorboard"))


class TensorboardServer:
    """One ``tensorboard --logdir LOGDIR --host 127.0.0.1 --port 0`` process (own process group).

    Args:
      logdir: the directory to serve.
      log: file receiving the server's output (its first line names the port).
      extra: further command-line flags.
      start_timeout_s: longest wait for the server to print its address.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, log: pathlib.Path, extra: tuple[str, ...] = (),
                 start_timeout_s: float = 90.0) -> None:
        self.logdir = str(logdir)
        self.log = log
        self.extra = extra
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> TensorboardServer:
        with open(self.log, "wb") as out:
            # stdin stays a pipe: the Rust data server exits when it closes.
            self.process = subprocess.Popen(
                [EXE, "--logdir", self.logdir, "--host", "127.0.0.1", "--port", "0", "--reload_interval", "1",
                 *self.extra],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if match := re.search(r"at (http://127\.0\.0\.1:\d+)/", self.log.read_text(errors="replace")):
                self.url = match.group(1)
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tensorboard did not start within {self.start_timeout_s:g} s: "
                           f"{self.log.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def json(self, path: str) -> Any:
        """GET ``path`` and decode its JSON body."""
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def scalar_steps(self, run: str, tag: str) -> list[int] | None:
        """Steps of a scalar series in the order the server returns them; None while it does not know it."""
        query = urllib.parse.urlencode({"run": run, "tag": tag})
        try:
            return [int(row[1]) for row in self.json(f"/data/plugin/scalars/scalars?{query}")]
        except urllib.error.HTTPError:
            return None

    def stop(self) -> None:
        """Stops the server and its data server (SIGTERM to the group, SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
