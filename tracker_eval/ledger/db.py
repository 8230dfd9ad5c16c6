"""The ledger's SQLite file: connection settings, versioned schema, transactions and the stream handle.

One file (``<output_dir>/ledger.sqlite``) may be shared by several processes. Every connection uses
WAL mode, ``synchronous=FULL`` and a busy timeout; every write is one ``BEGIN IMMEDIATE``
transaction, so a process killed at any instant leaves the last committed state. `LedgerStore` binds
the file to one stream (checkpoint directory + config hash) and keeps one connection per thread;
`tracker_eval.ledger.outbox.Outbox` and `tracker_eval.ledger.steps.Ledger` build on it.

    conn = connect(Path("out/ledger.sqlite"), busy_timeout_s=30.0)
    with write_transaction(conn):
        conn.execute("UPDATE steps SET ...")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tracker_eval.errors import ConfigError
from tracker_eval.ledger.schema import SchemaError, migrate
from tracker_eval.locations import normalize_checkpoint_dir
from tracker_eval.redact import redact_text

LEDGER_FILENAME = "ledger.sqlite"
RESULTS_DIRNAME = "results"


class LedgerError(RuntimeError):
    """The ledger cannot be opened or a requested change is not allowed."""


class LeaseLostError(LedgerError):
    """The caller acts under a claim it no longer holds (it expired and was taken over, or was never held)."""


class IllegalTransitionError(LedgerError):
    """The requested change does not lead from the current state (e.g. skipping an evaluated step)."""


def connect(path: Path, *, busy_timeout_s: float) -> sqlite3.Connection:
    """Opens the ledger file with the settings every connection needs and brings its schema up to date.

    Args:
      path: the SQLite file; created if missing.
      busy_timeout_s: how long a write waits for another process's write to finish.

    Returns:
      A connection in autocommit mode; writes go through `write_transaction`.

    Raises:
      LedgerError: the file cannot be opened, is not in WAL mode (e.g. a network file system), or
        was written by a newer version.
    """
    try:
        # isolation_level=None: the sqlite3 module must not open transactions behind our back;
        # each write states BEGIN IMMEDIATE itself.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        # FULL also fsyncs the WAL at each commit, so a power cut cannot forget a "delivered" or
        # "evaluated" commit; writes are a few per checkpoint, so the cost does not matter.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.row_factory = sqlite3.Row
    except sqlite3.Error as error:
        raise LedgerError(f"cannot open the ledger {path}: {error}; check that the directory is "
                          "writable and on a local file system") from error
    if str(mode).lower() != "wal":
        conn.close()
        raise LedgerError(
            f"the ledger {path} cannot use WAL mode (got journal_mode={mode!r}); put output_dir on a "
            "local file system (WAL needs shared memory, which network file systems lack)"
        )
    try:
        migrate(conn, path)
    except SchemaError as error:
        conn.close()
        raise LedgerError(str(error)) from None
    return conn


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic write: ``BEGIN IMMEDIATE`` takes the write lock first, so a read-then-write inside
    never races another process, and either everything inside commits or nothing does."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Several reads that see one consistent state of the file (inside an open one: that one)."""
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
    """The ledger file bound to one stream: per-thread connections and stream-level key/values.

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
        self._connections: list[sqlite3.Connection] = []
        _check_writable(self.output_dir)
        self._path = self.output_dir / LEDGER_FILENAME
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

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        # A connection must not cross fork(): the child opens its own.
        if getattr(local, "pid", None) != os.getpid():
            local.conn = connect(self._path, busy_timeout_s=self._busy_timeout_s)
            local.pid = os.getpid()
            with self._lock:
                self._connections.append(local.conn)
        return local.conn

    def _row(self, conn: sqlite3.Connection, step: int) -> sqlite3.Row | None:
        return conn.execute(
            "SELECT * FROM steps WHERE stream_id = ? AND step = ?", (self._stream, int(step))
        ).fetchone()

    def _set(self, conn: sqlite3.Connection, step: int, **fields: Any) -> None:
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

    def set_run_state(self, logger: str, state: Mapping[str, Any]) -> None:
        """Replaces `logger`'s run state (JSON-serializable, e.g. ``{"run_id": "abc"}``)."""
        conn = self._conn()
        with write_transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO run_state (stream_id, logger, state_json) VALUES (?, ?, ?)",
                (self._run_stream, logger, json.dumps(dict(state))),
            )

    def touch_heartbeat(self, owner: str) -> None:
        """Records that `owner` (the watcher) is alive now; a health check reads `last_heartbeat`."""
        conn = self._conn()
        with write_transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO meta (stream_id, key, value, updated_at) VALUES (?, 'heartbeat', ?, ?)",
                (self._run_stream, owner, self._clock()),
            )

    def last_heartbeat(self) -> tuple[str, float] | None:
        """The owner and unix time of the latest heartbeat, or None when there was none."""
        row = self._conn().execute(
            "SELECT value, updated_at FROM meta WHERE stream_id = ? AND key = 'heartbeat'", (self._run_stream,)
        ).fetchone()
        return None if row is None else (row[0], row[1])


def _stream_id(conn: sqlite3.Connection, checkpoint_dir: str, config_hash: str) -> int:
    conn.execute("INSERT OR IGNORE INTO streams (checkpoint_dir, config_hash) VALUES (?, ?)",
                 (checkpoint_dir, config_hash))
    (stream,) = conn.execute("SELECT stream_id FROM streams WHERE checkpoint_dir = ? AND config_hash = ?",
                             (checkpoint_dir, config_hash)).fetchone()
    return int(stream)


def _adopt_earlier(conn: sqlite3.Connection, checkpoint_dir: str, config_hash: str, earlier: Sequence[str]) -> None:
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
