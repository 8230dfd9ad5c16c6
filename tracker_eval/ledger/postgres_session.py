"""Sessions of a PostgreSQL ledger: the ledger's SQL on psycopg, transactions, and lost sessions.

    conn = PostgresConnection(raw, reopen=open_session, where="postgresql://***@db/evals")
    with conn.write_transaction():
        conn.execute("UPDATE steps SET ... WHERE stream_id = ?", (stream,))

A lost session (the server restarted or stopped a while, `pg_terminate_backend`, a network cut)
costs no work and never applies a write twice. A read outside a transaction waits for the server
and is asked again. A write transaction is all or nothing: when its session is lost before the
COMMIT was answered, nothing of it committed, or all of it did; each write inserts a random token
in the same transaction (``write_tokens``), so once the server answers again the token says which,
and `TransactionLostError` asks the caller to run the whole read-then-write again
(`tracker_eval.ledger.db.retried`) only when it did not commit. While the server does not answer,
every thread waits with a backoff (one warning a process, and one when it answers again), up to
`OUTAGE_LIMIT_S`, after which `DatabaseUnreachableError` ends the wait.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from tracker_eval.ledger.errors import DatabaseUnreachableError, TransactionLostError
from tracker_eval.redact import redact_text

_WRITE_LOCK = 0x7472_6B65_7631
"""The advisory lock every write transaction holds (any constant: one ledger per database)."""
OUTAGE_LIMIT_S = 600.0
"""How long a process waits for a ledger database that stopped answering before it gives up."""
_BACKOFF_S = (0.2, 5.0)  # first and longest wait between attempts to reach the server again
_TOKEN = re.compile(r"'(?:[^']|'')*'|\?|%")
LOG = logging.getLogger("tracker_eval")
T = TypeVar("T")


class Row:
    """A result row read by position (``row[0]``, unpacking) or column name (``row["state"]``), as `sqlite3.Row`."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = tuple(values)
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values, strict=True))!r})"


def row_factory(cursor: Any) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


@functools.lru_cache(maxsize=1024)
def pyformat(sql: str) -> str:
    """The ledger's ``?`` placeholders as psycopg's ``%s``; every ``%`` doubled, in quoted text too
    (psycopg reads the whole text for placeholders), and a ``?`` in quoted text kept."""

    def one(match: re.Match[str]) -> str:
        token = match.group()
        return "%s" if token == "?" else token.replace("%", "%%")

    return _TOKEN.sub(one, sql)


class _Outage:
    """One warning a process when the database stops answering, one when it answers again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._waiting = 0

    def begin(self, where: str, error: BaseException) -> None:
        with self._lock:
            self._waiting += 1
            if self._since is None:
                self._since = time.monotonic()
                LOG.warning("tracker-eval: the ledger database %s does not answer (%s); waiting for it (nothing is "
                            "lost: unfinished writes are made again)", where, _said(error))

    def end(self, where: str, *, reached: bool) -> None:
        with self._lock:
            self._waiting -= 1
            if reached and self._since is not None:
                LOG.warning("tracker-eval: the ledger database %s answers again (after %.1f s)", where,
                            time.monotonic() - self._since)
                self._since = None
            elif self._waiting == 0:
                self._since = None


_OUTAGE = _Outage()


def _said(error: BaseException) -> str:
    return redact_text(" ".join(str(error).split()))[:200] or type(error).__name__


def open_waiting(open_session: Callable[[], T], *, where: str, limit_s: float, error: BaseException | None = None) -> T:
    """`open_session()`, tried again with a backoff while the server does not answer.

    Raises:
      DatabaseUnreachableError: it did not answer within `limit_s`.
    """
    deadline = time.monotonic() + limit_s
    wait_s = _BACKOFF_S[0]
    reached, began = False, error is not None
    if began:
        _OUTAGE.begin(where, error)
    try:
        while True:
            try:
                session = open_session()
                reached = True
                return session
            except DatabaseUnreachableError as failure:
                if not began:
                    _OUTAGE.begin(where, failure)
                    began = True
                if time.monotonic() + wait_s > deadline:
                    raise DatabaseUnreachableError(
                        f"the ledger database {where} did not answer for {limit_s:.0f} s ({_said(failure)}); "
                        "start it again, then restart tracker-eval") from None
                time.sleep(wait_s)
                wait_s = min(wait_s * 2, _BACKOFF_S[1])
    finally:
        if began:
            _OUTAGE.end(where, reached=reached)


class PostgresConnection:
    """A psycopg connection that takes the ledger's SQL as a `sqlite3.Connection` does
    (`tracker_eval.ledger.backend.Connection`), plus its transactions; it opens a new session in
    place of one the server ended (module docstring).

    Args:
      raw: an open psycopg connection (autocommit).
      reopen: opens a new one, with the same session settings; None: a lost session is an error.
      where: the database for messages (password masked).
      outage_limit_s: the longest wait for the server to answer again.
    """

    def __init__(self, raw: Any, *, reopen: Callable[[], Any] | None = None, where: str = "",
                 outage_limit_s: float = OUTAGE_LIMIT_S) -> None:
        self.raw = raw
        self._reopen = reopen
        self._where = where
        self._outage_limit_s = outage_limit_s
        self._transaction: str | None = None  # "write" or "read" while one is open

    @property
    def alive(self) -> bool:
        """False once the server ended the session and no new one can be opened in its place."""
        return self._reopen is not None or not self._lost()

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus  # noqa: PLC0415

        return self.raw.info.transaction_status in (
            TransactionStatus.INTRANS, TransactionStatus.INERROR, TransactionStatus.ACTIVE)

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        # Always with a parameter list, so that psycopg reads the doubled % back as one.
        return self._run(lambda: self.raw.execute(pyformat(sql), tuple(parameters)))

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
        rows = [tuple(p) for p in parameters]

        def run() -> Any:
            cursor = self.raw.cursor()
            cursor.executemany(pyformat(sql), rows)
            return cursor

        return self._run(run)

    def close(self) -> None:
        self.raw.close()

    @contextlib.contextmanager
    def write_transaction(self, *, token: bool = True) -> Iterator[PostgresConnection]:
        """One atomic write, serialized with every other writer of the database (module docstring).

        Args:
          token: record the write's token (False only while ``write_tokens`` may not exist yet: migrations).

        Raises:
          TransactionLostError: the session was lost and the write did not commit; the server
            answers again, run the whole read-then-write again.
        """
        import psycopg  # noqa: PLC0415

        mark = secrets.token_hex(12)
        record = (f"; INSERT INTO write_tokens (token, committed_at) VALUES ('{mark}', "
                  "extract(epoch FROM clock_timestamp()))") if token else ""
        self._transaction = "write"
        try:
            # One round trip (a constant and a random hex token, so no parameters: the simple protocol
            # takes several statements). A lock wait that times out leaves an aborted transaction.
            self._run(lambda: self.raw.execute(
                f"BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock({_WRITE_LOCK}){record}"))
            yield self
            try:
                self.raw.execute("COMMIT")
            except psycopg.Error as error:
                if not self._lost() or not token:
                    raise
                # Sent, never answered: it committed or not. The token, written in the same transaction, says which.
                self._wait_for_server(error)
                if self.raw.execute("SELECT 1 FROM write_tokens WHERE token = %s", (mark,)).fetchone() is None:
                    raise TransactionLostError(self._lost_message(error)) from None
        except BaseException:
            self._rollback()
            raise
        finally:
            self._transaction = None

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[PostgresConnection]:
        """Several reads that see one consistent state (inside an open transaction: that one).

        Raises:
          TransactionLostError: the session was lost; read again.
        """
        if self._transaction is not None:
            yield self
            return
        self._run(lambda: self.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        self._transaction = "read"
        try:
            yield self
        finally:
            self._transaction = None
            if self.in_transaction:
                self.raw.execute("COMMIT")

    def _run(self, statement: Callable[[], T]) -> T:
        # Outside a transaction a statement is run again once the server answers (it is one read, or
        # a write that is its own transaction: `BEGIN`); inside one, the transaction is gone: say so.
        import psycopg  # noqa: PLC0415

        while True:
            try:
                return statement()
            except psycopg.Error as error:
                if not self._lost() or self._reopen is None:
                    raise
                self._wait_for_server(error)
                if self._transaction is not None:
                    raise TransactionLostError(self._lost_message(error)) from None

    def _lost(self) -> bool:
        return bool(self.raw.closed or self.raw.broken)

    def _lost_message(self, error: BaseException) -> str:
        return (f"the ledger database {self._where} ended the session mid-transaction ({_said(error)}); "
                "nothing of it committed")

    def _wait_for_server(self, error: BaseException) -> None:
        """Opens a new session in place of the lost one, waiting while the server does not answer (`open_waiting`)."""
        if self._reopen is None:
            raise TransactionLostError(self._lost_message(error)) from None
        with contextlib.suppress(Exception):
            self.raw.close()
        self.raw = open_waiting(self._reopen, where=self._where, limit_s=self._outage_limit_s, error=error)

    def _rollback(self) -> None:
        import psycopg  # noqa: PLC0415

        if not self._lost() and self.in_transaction:
            with contextlib.suppress(psycopg.Error):  # a lost connection has nothing left to roll back
                self.raw.execute("ROLLBACK")
