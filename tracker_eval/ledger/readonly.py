"""Reading a ledger without writing anything: one snapshot of one stream.

    found = read_stream("out", checkpoint_dir="/ckpt", config_hash="ab12", read=lambda conn, stream: ...,
                        busy_timeout_s=30.0)     # None: no ledger, no schema yet, no such stream

A PostgreSQL ledger (``url``) is read in one read-only, repeatable-read transaction of a session
whose transactions are read-only by default (`tracker_eval.ledger.postgres.read_database`), so a
role that may only SELECT suffices. The rest of this docstring is about the SQLite file.

A `tracker_eval.ledger.steps.Ledger` writes as it opens (a write probe, the stream row, logger and
best reconciliation), so reading through one would change what it reads. SQLite in WAL mode writes
even for a plain reader (it creates ``-wal`` and ``-shm`` beside the file), so the file is opened in
whichever of three ways writes nothing:

- no ``-wal`` file: no writer has the file open (the last one to close folds the WAL back into the
  file and removes it), so the file is complete and is read as ``immutable``, which creates
  nothing. A writer that appears meanwhile leaves a ``-wal`` or changes the file; the read is then
  done again the next way.
- a ``-wal`` file (a live writer, or one that was killed): ``mode=ro``, which sees every committed
  transaction through the shared-memory index. SQLite maintains that index (``-shm``) for every
  reader; the data (the file and its WAL) are never written.
- a read-only mount where ``-shm`` is missing, so SQLite cannot build that index: the file and its
  WAL are copied to a private temporary directory and read there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tracker_eval.ledger.db import LEDGER_FILENAME, LedgerError
from tracker_eval.ledger.schema import SCHEMA_VERSION
from tracker_eval.locations import normalize_checkpoint_dir

T = TypeVar("T")


def read_stream(
    output_dir: str | os.PathLike[str], *, checkpoint_dir: str | os.PathLike[str], config_hash: str,
    read: Callable[[Any, int], T], busy_timeout_s: float, url: str | None = None,
) -> T | None:
    """`read(conn, stream_id)` of one stream, in one snapshot, without writing; None when there is
    no ledger, no schema yet or no such stream. `url`: a PostgreSQL ledger instead of the file in `output_dir`."""
    key = (normalize_checkpoint_dir(checkpoint_dir), config_hash)
    if url is not None:
        from tracker_eval.ledger.postgres import read_database  # noqa: PLC0415

        return read_database(url, lambda conn: _lookup(conn, key, read))
    path = Path(output_dir) / LEDGER_FILENAME
    if not path.exists():
        return None

    def snapshot(conn: sqlite3.Connection) -> T | None:
        if not _schema_ready(conn, path):
            return None
        conn.execute("BEGIN")  # one snapshot for every query of `read`
        try:
            return _lookup(conn, key, read)
        finally:
            conn.execute("COMMIT")

    try:
        return _read_without_writing(path, snapshot, busy_timeout_s=busy_timeout_s)
    except sqlite3.Error as error:
        raise LedgerError(f"cannot read the ledger {path}: {error}") from error


def _lookup(conn: Any, key: tuple[str, str], read: Callable[[Any, int], T]) -> T | None:
    found = conn.execute("SELECT stream_id FROM streams WHERE checkpoint_dir = ? AND config_hash = ?", key).fetchone()
    return None if found is None else read(conn, found[0])


def _read_without_writing(path: Path, read: Callable[[sqlite3.Connection], T], *, busy_timeout_s: float) -> T:
    wal = Path(f"{path}-wal")
    if not wal.exists():
        before = _identity(path)
        with _connect(f"file:{_quote(path)}?immutable=1", busy_timeout_s) as conn:
            result = read(conn)
        if not wal.exists() and _identity(path) == before:
            return result
    try:
        with _connect(f"file:{_quote(path)}?mode=ro", busy_timeout_s) as conn:
            return read(conn)
    except sqlite3.OperationalError:
        # A read-only mount without the shared-memory file: read a private copy instead.
        with tempfile.TemporaryDirectory(prefix="tracker-eval-ledger-") as tmp:
            copy = Path(tmp) / path.name
            shutil.copyfile(path, copy)
            if wal.exists():
                shutil.copyfile(wal, f"{copy}-wal")
            with _connect(f"file:{_quote(copy)}", busy_timeout_s) as conn:
                return read(conn)


@contextlib.contextmanager
def _connect(uri: str, busy_timeout_s: float) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA query_only = ON")
        yield conn
    finally:
        conn.close()


def _schema_ready(conn: sqlite3.Connection, path: Path) -> bool:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:  # being created right now
        return False
    if version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        raise LedgerError(
            f"the ledger {path} has schema version {version}, "
            + ("newer than this tracker-eval understands; upgrade tracker-eval"
               if newer else "older than this tracker-eval's; run `tracker-eval watch` once to upgrade it")
            + f" (this version reads {SCHEMA_VERSION}; status never changes the file)"
        )
    return True


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _quote(path: Path) -> str:
    # A file: URI: "?" and "#" in a directory name must not start the query or fragment.
    return str(path.absolute()).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
