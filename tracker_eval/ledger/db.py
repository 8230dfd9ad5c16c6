"""The ledger's database bound to one stream: transactions, per-thread connections and stream-level state.

The database is the SQLite file ``<output_dir>/ledger.sqlite`` (`tracker_eval.ledger.sqlite`) or a
PostgreSQL database named by URL (`tracker_eval.ledger.postgres`); `tracker_eval.ledger.backend`
is the seam between them. Every write is one `write_transaction` that excludes every other
writer, so a process killed at any instant leaves the last committed state. `LedgerStore` binds
the database to one stream (checkpoint directory + config hash) and keeps one connection per
thread; `tracker_eval.ledger.outbox.Outbox` and `tracker_eval.ledger.steps.Ledger` build on it.

    conn = SqliteBackend(Path("out/ledger.sqlite"), busy_timeout_s=30.0).connect()
    with write_transaction(conn):
        conn.execute("UPDATE steps SET ...")
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tracker_eval.errors import ConfigError
from tracker_eval.ledger.backend import LEDGER_FILENAME, Connection, open_backend
from tracker_eval.ledger.errors import IllegalTransitionError, LeaseLostError, LedgerError, TransactionLostError
from tracker_eval.locations import normalize_checkpoint_dir
from tracker_eval.redact import redact_text

__all__ = ["LEDGER_FILENAME", "IllegalTransitionError", "LeaseLostError", "LedgerError", "LedgerStore",
           "read_snapshot", "write_transaction"]

RESULTS_DIRNAME = "results"


_RETRIES = 20
"""Lost sessions one write may meet in a row before its error is raised (each waits for the server first)."""
F = TypeVar("F", bound=Callable[..., Any])


def retried(method: F) -> F:
    """Runs a ledger method again, whole, when its write transaction was lost before it committed.

    A method's read-then-write decides on what it reads inside its transaction, so running it again
    after a lost session (`TransactionLostError`: nothing committed, the server answers again)
    decides afresh and applies its effect once. On SQLite a transaction is never lost this way.
    """

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(_RETRIES):
            try:
                return method(self, *args, **kwargs)
            except TransactionLostError:
                if attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    return run  # type: ignore[return-value]


@contextlib.contextmanager
def write_transaction(conn: Connection) -> Iterator[Connection]:
    """One atomic write that excludes every other writer first, so a read-then-write inside never
    races another process, and either everything inside commits or nothing does. On SQLite that is
    ``BEGIN IMMEDIATE`` (the file's write lock); PostgreSQL's connection brings its own
    (`tracker_eval.ledger.postgres.PostgresConnection.write_transaction`)."""
    if not isinstance(conn, sqlite3.Connection):
        with conn.write_transaction():  # type: ignore[attr-defined]
            yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def read_snapshot(conn: Connection) -> Iterator[Connection]:
    """Several reads that see one consistent state of the database (inside an open one: that one)."""
    if not isinstance(conn, sqlite3.Connection):
        with conn.read_snapshot():  # type: ignore[attr-defined]
            yield conn
        return
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


class LedgerStore:
    """The ledger's database bound to one stream: per-thread connections and stream-level key/values.

    Subclasses add the outbox and the step state machine; construct `tracker_eval.ledger.steps.Ledger`.
    """

    suite_version = 1
    """Which version of its suite this stream is: its rank among the run's streams of that suite
    name, in the order the ledger first saw them (`tracker_eval.identity.suite_label`)."""

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        checkpoint_dir: str | os.PathLike[str],
        config_hash: str,
        loggers: Sequence[str],
        busy_timeout_s: float,
        clock: Callable[[], float],
        run_hash: str | None = None,
        suite: str = "",
        earlier_hashes: Sequence[str] = (),
        url: str | None = None,
    ) -> None:
        if len(set(loggers)) != len(loggers) or not all(isinstance(n, str) and n for n in loggers):
            raise ConfigError(f"loggers={list(loggers)!r} must be distinct non-empty names")
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = normalize_checkpoint_dir(checkpoint_dir)
        self.config_hash = config_hash
        self.loggers = tuple(loggers)
        self._busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Connection] = []
        _check_writable(self.output_dir)
        self.url = url
        self.data_in_database = url is not None
        """Whether stored results' arrays and samples live in the database (PostgreSQL: shared
        between machines) rather than in files under `output_dir` (SQLite)."""
        self._backend = open_backend(url, output_dir=self.output_dir, busy_timeout_s=busy_timeout_s)
        key = hashlib.sha256(f"{self.checkpoint_dir}\0{config_hash}".encode()).hexdigest()[:16]
        self._results_dir = self.output_dir / RESULTS_DIRNAME / key
        self.suite = suite
        conn = self._conn()
        with write_transaction(conn):
            _adopt_earlier(conn, self.checkpoint_dir, config_hash, earlier_hashes)
            self._stream = self._run_stream = _stream_id(conn, self.checkpoint_dir, config_hash)
            if run_hash is not None and run_hash != config_hash:
                self._run_stream = _stream_id(conn, self.checkpoint_dir, run_hash)
                conn.execute("UPDATE streams SET parent_id = ?, suite = ? WHERE stream_id = ?",
                             (self._run_stream, suite, self._stream))
                (self.suite_version,) = conn.execute(
                    "SELECT COUNT(*) FROM streams WHERE parent_id = ? AND suite = ? AND stream_id <= ?",
                    (self._run_stream, suite, self._stream)).fetchone()

    def close(self) -> None:
        """Closes every connection this instance opened (from any thread)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _conn(self) -> Connection:
        local = self._local
        # A connection must not cross fork(): the child opens its own. A PostgreSQL session the server
        # ended (a restart) is replaced: the call that met the end failed, the next one goes on.
        if getattr(local, "pid", None) != os.getpid() or not getattr(local.conn, "alive", True):
            local.conn = self._backend.connect()
            local.pid = os.getpid()
            with self._lock:
                self._connections.append(local.conn)
        return local.conn

    def _row(self, conn: Connection, step: int) -> Any:
        return conn.execute(
            "SELECT * FROM steps WHERE stream_id = ? AND step = ?", (self._stream, int(step))
        ).fetchone()

    def _set(self, conn: Connection, step: int, **fields: Any) -> None:
        if isinstance(fields.get("reason"), str):
            fields["reason"] = redact_text(fields["reason"])  # an error text may quote a credential
        fields["updated_at"] = self._clock()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        conn.execute(
            f"UPDATE steps SET {assignments} WHERE stream_id = ? AND step = ?",
            (*fields.values(), self._stream, int(step)),
        )

    def get_run_state(self, logger: str) -> dict[str, Any]:
        """What `logger` stored to find its tracker run again after a restart ({} when nothing)."""
        row = self._conn().execute(
            "SELECT state_json FROM run_state WHERE stream_id = ? AND logger = ?", (self._run_stream, logger)
        ).fetchone()
        return {} if row is None else json.loads(row[0])

    @retried
    def set_run_state(self, logger: str, state: Mapping[str, Any]) -> None:
        """Replaces `logger`'s run state (JSON-serializable, e.g. ``{"run_id": "abc"}``)."""
        conn = self._conn()
        with write_transaction(conn):
            conn.execute(
                "INSERT INTO run_state (stream_id, logger, state_json) VALUES (?, ?, ?) "
                "ON CONFLICT (stream_id, logger) DO UPDATE SET state_json = excluded.state_json",
                (self._run_stream, logger, json.dumps(dict(state))),
            )

    @retried
    def touch_heartbeat(self, owner: str) -> None:
        """Records that `owner` (the watcher) is alive now; a health check reads `last_heartbeat`."""
        conn = self._conn()
        with write_transaction(conn):
            conn.execute(
                "INSERT INTO meta (stream_id, key, value, updated_at) VALUES (?, 'heartbeat', ?, ?) "
                "ON CONFLICT (stream_id, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (self._run_stream, owner, self._clock()),
            )

    def last_heartbeat(self) -> tuple[str, float] | None:
        """The owner and unix time of the latest heartbeat, or None when there was none."""
        row = self._conn().execute(
            "SELECT value, updated_at FROM meta WHERE stream_id = ? AND key = 'heartbeat'", (self._run_stream,)
        ).fetchone()
        return None if row is None else (row[0], row[1])


def _stream_id(conn: Connection, checkpoint_dir: str, config_hash: str) -> int:
    conn.execute("INSERT INTO streams (checkpoint_dir, config_hash) VALUES (?, ?) ON CONFLICT DO NOTHING",
                 (checkpoint_dir, config_hash))
    (stream,) = conn.execute("SELECT stream_id FROM streams WHERE checkpoint_dir = ? AND config_hash = ?",
                             (checkpoint_dir, config_hash)).fetchone()
    return int(stream)


def _adopt_earlier(conn: Connection, checkpoint_dir: str, config_hash: str, earlier: Sequence[str]) -> None:
    # A stream an earlier release hashed otherwise (e.g. a plug-in suite's raw options) becomes this
    # one's when it has none yet: its steps, deliveries and best stay, nothing is evaluated again.
    if not earlier or conn.execute("SELECT 1 FROM streams WHERE checkpoint_dir = ? AND config_hash = ?",
                                   (checkpoint_dir, config_hash)).fetchone() is not None:
        return
    for old in earlier:
        found = conn.execute("SELECT stream_id FROM streams WHERE checkpoint_dir = ? AND config_hash = ?",
                             (checkpoint_dir, old)).fetchone()
        if found is not None:
            conn.execute("UPDATE streams SET config_hash = ? WHERE stream_id = ?", (config_hash, found[0]))
            return


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # A real write, because os.access misjudges read-only mounts, ACLs and root.
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=output_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise LedgerError(
            f"output_dir {str(output_dir)!r} is not writable ({error.strerror or error}); the ledger "
            f"and per-example results live there. Make it writable by this user (uid {os.getuid()}), "
            "e.g. mount a writable volume there, or choose another output_dir"
        ) from error
