"""The ledger in a SQLite file beside the results: the default backend, for processes that share a disk.

    backend = SqliteBackend(Path("out/ledger.sqlite"), busy_timeout_s=30.0)
    conn = backend.connect()      # WAL, synchronous=FULL, busy timeout, schema up to date
    with write_transaction(conn):  # tracker_eval.ledger.db: BEGIN IMMEDIATE
        conn.execute("UPDATE steps SET ...")

The file may be shared by several processes of one machine (or of machines that share a local
block device). Every connection uses WAL mode, ``synchronous=FULL`` and a busy timeout; every write
is one ``BEGIN IMMEDIATE`` transaction, so a process killed at any instant leaves the last
committed state.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tracker_eval.ledger.errors import LedgerError
from tracker_eval.ledger.schema import SchemaError, migrate


class SqliteBackend:
    """`tracker_eval.ledger.backend.Backend` over one SQLite file.

    Args:
      path: the file (``<output_dir>/ledger.sqlite``); created if missing.
      busy_timeout_s: how long a write waits for another process's write to finish.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s

    @property
    def where(self) -> str:
        return str(self.path)

    def connect(self) -> sqlite3.Connection:
        return connect(self.path, busy_timeout_s=self._busy_timeout_s)


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
        mode = _wal(conn, busy_timeout_s=busy_timeout_s)
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



def _wal(conn: sqlite3.Connection, *, busy_timeout_s: float) -> str:
    """Switches to WAL and returns the journal mode. Processes opening a new file at once may meet
    "database is locked" here without SQLite's busy handler waiting (the switch needs the file to
    itself), so the switch is tried again until the busy timeout has passed."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)  # the other opener needs milliseconds
