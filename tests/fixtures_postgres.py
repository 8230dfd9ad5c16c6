"""A real PostgreSQL server on loopback for tests: Debian's ``postgresql`` package, started per session.

`PostgresServer` runs ``initdb`` in a temporary directory and ``postgres`` on 127.0.0.1 on a free
port, as the unprivileged ``postgres`` user when the tests run as root (the server refuses root).
It can be stopped and started again on the same port and data (an outage), and hands out fresh
databases so that tests do not see each other's rows. The ``postgres_server`` fixture shares one
server per test session (per pytest-xdist worker); ``postgres_url`` is a fresh database per test.

    # in a test module
    pytest_plugins = ["fixtures_postgres"]

    def test_x(postgres_url):
        ledger = Ledger(tmp_path, url=postgres_url, ...)
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SUPERUSER = "tracker"
"""The cluster's superuser (``initdb -U``); trust authentication on loopback, so no password."""
_UNPRIVILEGED = "postgres"
_INSTALL_HINT = ("install Debian's PostgreSQL server with `apt-get update && apt-get install -y postgresql` "
                 "(as root; `make test` does this when it can), or set TRACKER_EVAL_PG_BIN to the folder "
                 "holding initdb and postgres")


FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "400",
                 "shared_buffers": "32MB"}
"""Durability is not under test (the cluster is thrown away after the session); speed is."""
DURABLE_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
"""PostgreSQL's defaults: every commit reaches the disk, as SQLite's synchronous=FULL does."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: TRACKER_EVAL_PG_BIN, PATH, or Debian's
    ``/usr/lib/postgresql/<version>/bin`` (newest version), where ``apt-get install postgresql`` puts them."""
    named = os.environ.get("TRACKER_EVAL_PG_BIN")
    candidates = [Path(named)] if named else []
    if found := shutil.which("initdb"):
        candidates.append(Path(found).resolve().parent)
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in debian), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                         reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, served on 127.0.0.1.

    Args:
      root: directory for the data folder, the socket and ``server.log`` (created; owned by the
        server's user, so every folder above it must be open to that user); default a fresh
        temporary directory, which `remove` deletes.
      port: port to listen on (default a free one).
      start_timeout_s: longest wait for the server to accept connections.
      settings: server settings over `FAST_SETTINGS` (e.g. ``DURABLE_SETTINGS`` for timings that
        compare with SQLite's synchronous=FULL).
    """

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, port: int | None = None, start_timeout_s: float = 60.0,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        folder = server_bin()
        if folder is None:
            raise RuntimeError(f"no PostgreSQL server found; {_INSTALL_HINT}")
        self.bin = folder
        # Not pytest's tmp_path: its folders are private to the tests' user, and the server's user
        # must reach its data folder.
        self.root = Path(tempfile.mkdtemp(prefix="tracker-eval-pg-") if root is None else root)
        self.data = self.root / "data"
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self.process: subprocess.Popen[bytes] | None = None
        # The server refuses to run as root; as root it runs as the package's unprivileged user.
        self._user = _UNPRIVILEGED if os.geteuid() == 0 else None
        self.root.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._initdb()

    @property
    def url(self) -> str:
        """The superuser's URL of the maintenance database ``postgres``."""
        return self.url_of("postgres")

    def url_of(self, database: str, *, user: str = SUPERUSER, password: str | None = None) -> str:
        """``postgresql://user[:password]@127.0.0.1:port/database``."""
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def _run_as_server_user(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, check=False, user=self._user,
                              group=self._user, extra_groups=[] if self._user else None, cwd=self.root)

    def _initdb(self) -> None:
        # --no-sync: the cluster is thrown away after the session.
        done = self._run_as_server_user([
            str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--no-sync", "-E", "UTF8", "--locale=C",
        ])
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        hba = self.data / "pg_hba.conf"
        # Roles made with a password must give it over TCP (tests of passwords and privileges); the
        # superuser, which has none, stays trusted.
        hba.write_text(
            f"local all all trust\nhost all {SUPERUSER} 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )

    def start(self) -> PostgresServer:
        """Starts the server and returns once it accepts connections.

        Raises:
          RuntimeError: the server exited or did not accept connections within ``start_timeout_s`` (log tail attached).
        """
        log = open(self.root / "server.log", "ab")
        command = [
            str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
            "-k", str(self.root),
            *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")),
        ]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        user=self._user, group=self._user,
                                        extra_groups=[] if self._user else None, cwd=self.root)
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            ready = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                                    "-U", SUPERUSER, "-d", "postgres", "-t", "2"], check=False)
            if ready.returncode == 0:
                return self
            time.sleep(0.05)  # a poll interval, not a wait for a guessed duration
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start on port {self.port}; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stops the server (fast shutdown: open transactions are rolled back) and waits for it to exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def remove(self) -> None:
        """Stops the server and deletes its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def sql(self, statement: str, *, database: str = "postgres") -> str:
        """Runs one statement as the superuser with ``psql`` (autocommit) and returns its unaligned output."""
        done = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", statement],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        """Creates an empty database owned by the superuser; returns its URL."""
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url_of(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server per test session (per xdist worker), stopped and removed at the end."""
    if server_bin() is None:
        pytest.fail(f"PostgreSQL is needed for the ledger's PostgreSQL tests but is not installed; {_INSTALL_HINT}")
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.remove()


_counter = iter(range(1_000_000))


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database of the session's server (the superuser's URL)."""
    return postgres_server.create_database(f"t{os.getpid()}_{next(_counter)}")
