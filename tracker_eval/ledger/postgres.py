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

Lost sessions and outages are handled where sessions live (`tracker_eval.ledger.postgres_session`).

psycopg 3 is imported here only, and this module only for a postgresql:// ledger URL
(`tracker_eval.ledger.backend.open_backend`): a SQLite user's start does not pay for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from tracker_eval.config.ledger import ENV_VAR
from tracker_eval.ledger.errors import DatabaseUnreachableError, LedgerError
from tracker_eval.ledger.postgres_schema import migrate_postgres, schema_version
from tracker_eval.ledger.postgres_session import (
    OUTAGE_LIMIT_S,
    PostgresConnection,
    open_waiting,
    row_factory,
)
from tracker_eval.ledger.schema import SCHEMA_VERSION
from tracker_eval.redact import redact_text

_CONNECT_TIMEOUT_S = 10
_TOKEN_AGE_S = 86400.0  # tokens of writes older than this are pruned; a lost COMMIT is resolved within seconds
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

    options: dict[str, Any] = {"autocommit": True, "row_factory": row_factory, "application_name": "tracker-eval"}
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
