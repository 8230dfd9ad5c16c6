"""The seam between the ledger's logic and the database that stores it: SQLite or PostgreSQL.

    backend = open_backend(url, output_dir=Path("out"), busy_timeout_s=30.0)
    conn = backend.connect()
    with write_transaction(conn):          # tracker_eval.ledger.db
        conn.execute("UPDATE steps SET state = ? WHERE ...", (...))

The ledger's statements are written once, in SQL that both databases accept (``INSERT ... ON
CONFLICT``, ``?`` placeholders), against a `Connection`: a `sqlite3.Connection` as it is, or
`tracker_eval.ledger.postgres.PostgresConnection`, which translates placeholders and reads rows by
position or name as `sqlite3.Row` does. What differs stays behind this seam: how a connection is
opened and its schema migrated, and how a write transaction excludes other writers
(`tracker_eval.ledger.db.write_transaction`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

LEDGER_FILENAME = "ledger.sqlite"


class Cursor(Protocol):
    """What the ledger reads from an executed statement."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """One connection in autocommit mode; rows read by position or column name."""

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Opens connections to one ledger database, its schema brought up to date."""

    @property
    def where(self) -> str:
        """The database for messages: the file's path, or the URL with its password masked."""
        ...

    def connect(self) -> Connection:
        """A new connection.

        Raises:
          LedgerError: the database cannot be reached or used; the message names the fix.
        """
        ...


def open_backend(url: str | None, *, output_dir: Path, busy_timeout_s: float) -> Backend:
    """The backend of a ledger URL: None for the SQLite file in `output_dir`, else PostgreSQL.

    The PostgreSQL module (and its driver) is imported only here, only for a postgresql:// URL.
    """
    if url is None:
        from tracker_eval.ledger.sqlite import SqliteBackend  # noqa: PLC0415

        return SqliteBackend(output_dir / LEDGER_FILENAME, busy_timeout_s=busy_timeout_s)
    from tracker_eval.ledger.postgres import PostgresBackend  # noqa: PLC0415

    return PostgresBackend(url, busy_timeout_s=busy_timeout_s)
