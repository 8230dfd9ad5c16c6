"""The ledger in a PostgreSQL database, shared by watchers and training processes on many machines.

    backend = PostgresBackend("postgresql://evals@db:5432/evals", busy_timeout_s=30.0)
    conn = backend.connect()        # schema created or migrated, privileges checked
    with write_transaction(conn):   # tracker_eval.ledger.db
        conn.execute("UPDATE steps SET ... WHERE stream_id = ?", (stream,))

One writer at a time, as on SQLite. There every write is ``BEGIN IMMEDIATE``: it takes the file's
write lock before its first read, so a read-then-write (a claim, a lease) never races another
process. Here a write transaction takes one transaction-scoped advisory lock first and runs at READ
COMMITTED, so each of its statements sees everything committed before the lock was granted and
nothing commits beside it: the same serial order, so claims, leases and the outbox behave as on
SQLite, and no transaction fails for serialization and needs replaying. Writes are a few short
ones per checkpoint, while an evaluation takes seconds to hours, so one lock per database does not
limit how many evaluators share the work.

A lost session (the server restarted or stopped a while, `pg_terminate_backend`, a network cut)
costs no work and never applies a write twice. A read outside a transaction waits for the server
and is asked again. A write transaction is all or nothing: when its session is lost before the
COMMIT was answered, nothing of it committed, or all of it did; each write inserts a random token
in the same transaction (``write_tokens``), so once the server answers again the token says which,
and `TransactionLostError` asks the caller to run the whole read-then-write again
(`tracker_eval.ledger.db.retried`) only when it did not commit. While the server does not answer,
every thread waits with a backoff (one warning a process, and one when it answers again), up to
`OUTAGE_LIMIT_S`, after which `DatabaseUnreachableError` ends the wait.

psycopg 3 is imported here only, and this module only for a postgresql:// ledger URL
(`tracker_eval.ledger.backend.open_backend`): a SQLite user's start does not pay for it.
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

from tracker_eval.config.ledger import ENV_VAR
from tracker_eval.ledger.errors import DatabaseUnreachableError, LedgerError, TransactionLostError
from tracker_eval.ledger.postgres_schema import migrate_postgres, schema_version
from tracker_eval.ledger.schema import SCHEMA_VERSION
from tracker_eval.redact import redact_text

_WRITE_LOCK = 0x7472_6B65_7631
"""The advisory lock every write transaction holds (any constant: one ledger per database)."""
_CONNECT_TIMEOUT_S = 10
OUTAGE_LIMIT_S = 600.0
"""How long a process waits for a ledger database that stopped answering before it gives up."""
_BACKOFF_S = (0.2, 5.0)  # first and longest wait between attempts to reach the server again
_TOKEN_AGE_S = 86400.0  # tokens of writes older than this are pruned; a lost COMMIT is resolved within seconds
LOG = logging.getLogger("tracker_eval")
_TOKEN = re.compile(r"'(?:[^']|'')*'|\?|%")
T = TypeVar("T")


class PostgresBackend:
    """`tracker_eval.ledger.backend.Backend` over one PostgreSQL database.

    Args:
      url: a libpq URL (``postgresql://USER@HOST:PORT/DB``; ``PGPASSWORD``, a passfile and
        ``sslmode=`` work as libpq defines them).
      busy_timeout_s: how long a write waits for another process's write (``lock_timeout``).
    """

    def __init__(self, url: str, *, busy_timeout_s: float, outage_limit_s: float = OUTAGE_LIMIT_S) -> None:
        self.url = url
        self._busy_timeout_s = busy_timeout_s
        self._outage_limit_s = outage_limit_s
        self._migrated = False

    @property
    def where(self) -> str:
        return redact_text(self.url)

    def connect(self) -> PostgresConnection:
        # Once this process has used the database, a new session (a new thread's) waits out an
        # outage like a lost one; the first one fails at once: a wrong URL is the user's to fix now.
        if self._migrated:
            raw = open_waiting(self._session, where=self.where, limit_s=self._outage_limit_s)
        else:
            raw = self._session()
        conn = PostgresConnection(raw, reopen=self._session, where=self.where, outage_limit_s=self._outage_limit_s)
        if self._migrated:
            return conn
        try:
            migrate_postgres(conn, where=self.where)
            conn.execute("DELETE FROM write_tokens WHERE committed_at < extract(epoch FROM clock_timestamp()) - ?",
                         (_TOKEN_AGE_S,))
        except BaseException:
            conn.close()
            raise
        self._migrated = True
        return conn

    def _session(self) -> Any:
        raw = open_connection(self.url, read_only=False)
        wait_ms = int(self._busy_timeout_s * 1000)
        try:
            raw.execute(f"SET lock_timeout = '{wait_ms}ms'")
            # A process stalled inside a write (SIGSTOP, a paused VM) would hold the write lock for
            # ever; the server ends such a session well before the others' wait runs out, and the
            # stalled process finds its write rolled back when it goes on.
            raw.execute(f"SET idle_in_transaction_session_timeout = '{max(wait_ms // 2, 1)}ms'")
        except BaseException:
            raw.close()
            raise
        return raw


def read_database(url: str, read: Callable[[PostgresConnection], T]) -> T | None:
    """`read(conn)` in one read-only snapshot of a session that cannot write; None when the database
    has no ledger yet. A role that may only SELECT suffices (``tracker-eval status``).

    Raises:
      LedgerError: the database cannot be reached, or has a schema this version cannot read.
    """
    import psycopg  # noqa: PLC0415

    conn = PostgresConnection(open_connection(url, read_only=True))
    try:
        version = schema_version(conn)
        if version == 0:
            return None
        if version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise LedgerError(
                f"the ledger database {redact_text(url)} has schema version {version}, "
                + ("newer than this tracker-eval understands; upgrade tracker-eval"
                   if newer else "older than this tracker-eval's; run `tracker-eval watch` once to upgrade it")
                + f" (this version reads {SCHEMA_VERSION}; status never changes the database)"
            )
        with conn.read_snapshot():
            return read(conn)
    except psycopg.Error as error:
        raise LedgerError(f"cannot read the ledger database {redact_text(url)}: {redact_text(str(error))}; "
                          "check that the server runs and this user may SELECT its tables") from None
    finally:
        conn.close()


def open_connection(url: str, *, read_only: bool) -> Any:
    """A psycopg connection in autocommit mode whose rows read by position or name.

    Raises:
      LedgerError: psycopg is missing, or the server cannot be reached or refuses the user or the
        database; one line naming the fix.
    """
    try:
        import psycopg  # noqa: PLC0415 - only a PostgreSQL ledger needs the driver
    except ImportError:
        raise LedgerError(
            f"the ledger URL {redact_text(url)} needs the PostgreSQL driver psycopg, which is not installed; "
            "install it with `pip install 'tracker-eval[postgres]'`"
        ) from None
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    options: dict[str, Any] = {"autocommit": True, "row_factory": _row_factory, "application_name": "tracker-eval"}
    try:
        given = conninfo_to_dict(url)
        if "connect_timeout" not in given:
            options["connect_timeout"] = _CONNECT_TIMEOUT_S
        if read_only:  # beside the URL's own server options, if it has any
            options["options"] = " ".join(filter(None, (given.get("options"), "-c default_transaction_read_only=on")))
        return psycopg.connect(url, **options)
    except psycopg.Error as error:
        said = explain_connect_error(error, url)
        unreachable = said.startswith("cannot reach")
        raise (DatabaseUnreachableError if unreachable else LedgerError)(said) from None


def explain_connect_error(error: Exception, url: str) -> str:
    """One line saying why a connection to `url` failed and how to fix it (password masked)."""
    shown = redact_text(url)
    said = redact_text(" ".join(str(error).split()))
    code = getattr(error, "sqlstate", None)
    where = f"ledger.url (or {ENV_VAR})"
    if code == "3D000" or re.search(r'database "[^"]*" does not exist', said):
        return (f"the ledger database of {shown} does not exist ({said}); create it, e.g. "
                f"`createdb -h HOST -p PORT -U OWNER DATABASE`, or name an existing database in {where}")
    if code in ("28P01", "28000") or "authentication failed" in said or "no password supplied" in said \
            or re.search(r'role "[^"]*" does not exist', said):
        return (f"the ledger database {shown} refused the user ({said}); check the user in {where} and "
                "its password (PGPASSWORD, ~/.pgpass, or the URL)")
    if code == "42501" or "permission denied" in said:
        return (f"the ledger database {shown} denies this user ({said}); as the database owner run "
                "GRANT CONNECT ON DATABASE ... TO the user, or use a user that may connect")
    if "invalid" in said and ("value" in said or "option" in said or "URI" in said):
        return f"the ledger URL {shown} is not valid ({said}); correct it in {where}"
    return (f"cannot reach the ledger database {shown} ({said}); start the server, or correct its host and "
            f"port in {where}")


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


def _row_factory(cursor: Any) -> Any:
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
