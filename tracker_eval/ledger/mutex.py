"""A lock shared by every process of a run, wherever they run: beside a SQLite ledger or in PostgreSQL.

    with run_mutex("mlflow-run " + run_key, url=ledger_url, output_dir="out"):
        ...   # find-or-create something outside the ledger that must exist once per run

Some things a run creates live outside the ledger and have no "create if absent" (an MLflow run
found by its tag). Processes of a SQLite ledger share its machine and `output_dir`, so a file lock
there orders them. Processes of a PostgreSQL ledger may share no disk at all; they share the
database, so the lock is a session-level advisory lock on a connection of its own, keyed by a
hash of the name: it is released when the block ends, and by the server when the holder's
process dies (its session ends), so a crash never leaves it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def run_mutex(name: str, *, url: str | None, output_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Holds the run-wide lock `name` for the block (other holders of `name` wait).

    Args:
      name: what is locked; any text (only its hash is used, so it may hold a URL).
      url: the run's PostgreSQL ledger, or None for a SQLite ledger in `output_dir`.
      output_dir: the run's output folder (where a SQLite ledger's lock file goes).

    Raises:
      LedgerError: the database cannot be reached (PostgreSQL).
    """
    digest = hashlib.sha256(name.encode()).hexdigest()
    if url is None:
        path = Path(output_dir) / f".lock-{digest[:16]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    from tracker_eval.ledger.postgres import open_connection  # noqa: PLC0415 - psycopg only for PostgreSQL

    key = int(digest[:16], 16) - (1 << 63)  # the signed 64-bit key of pg_advisory_lock
    conn = open_connection(url, read_only=False)
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # a session the server ended holds nothing any more
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()

