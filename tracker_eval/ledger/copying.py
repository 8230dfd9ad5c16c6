"""Moving a run that outgrew one machine: a SQLite ledger's whole history copied into PostgreSQL.

    copied = copy_ledger(Path("out/ledger.sqlite"), "postgresql://evals@db:5432/evals")
    copied.rows       # {"streams": 2, "steps": 40, "outbox": 120, ...}
    copied.already    # True: the database held this very history already, nothing was written

The copy is one transaction under the database's write lock: every table, row by row, stream ids
kept (a suite's stream names its run's stream by id), so each step's state, attempts, stored
result, deliveries (made, pending, undeliverable, in flight) and the best step go on where the file
left them. Copying again changes nothing. A database that holds any other history is refused
rather than merged: two histories of one run could each say that a different process holds or
delivered a step. Stored results' per-example arrays and samples, files under the file's
``output_dir``, are copied into the database (``result_data``, byte for byte), as a PostgreSQL
ledger keeps them: any evaluator of the run can then deliver them, on any machine.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from tracker_eval.ledger.errors import LedgerError
from tracker_eval.ledger.files import folder_data
from tracker_eval.ledger.postgres import PostgresBackend, PostgresConnection
from tracker_eval.ledger.postgres_schema import TABLES
from tracker_eval.ledger.sqlite import connect as connect_sqlite


@dataclasses.dataclass(frozen=True)
class CopiedLedger:
    """What `copy_ledger` did.

    Attributes:
      rows: table -> rows the source holds (all of them copied, unless `already`).
      already: the database held exactly this history before; nothing was written.
    """

    rows: dict[str, int]
    already: bool


def copy_ledger(source: Path, url: str, *, busy_timeout_s: float = 30.0) -> CopiedLedger:
    """Copies the SQLite ledger file `source` into the PostgreSQL database `url`, all or nothing.

    Stop the processes that write `source` first: what they write afterwards stays in the file.

    Args:
      source: a ``ledger.sqlite`` (brought to the current schema first, as a watcher would).
      url: the PostgreSQL ledger (its tables are created when missing).
      busy_timeout_s: how long to wait for another writer of either ledger.

    Returns:
      The rows copied per table, or that the database held this history already.

    Raises:
      LedgerError: the database holds another history (it is left as it was), or either ledger
        cannot be opened.
    """
    if not source.is_file():
        raise LedgerError(f"no ledger file {source} to copy; check --config (and its output_dir)")
    file = connect_sqlite(source, busy_timeout_s=busy_timeout_s)
    try:
        file.execute("BEGIN")  # one snapshot of the file, even with a writer beside
        history = {table: _rows(file, table) for table in COPIED}
        file.execute("COMMIT")
    finally:
        file.close()
    history = _files_into_rows(history, source.parent)
    backend = PostgresBackend(url, busy_timeout_s=busy_timeout_s)
    database = backend.connect()
    try:
        with database.write_transaction(token=False):  # one try, not retried: no token to read back
            held = {table: _rows(database, table) for table in COPIED}
            counts = {table: len(rows) for table, (_, rows) in history.items()}
            if all(Counter(rows) == Counter(held[table][1]) for table, (_, rows) in history.items()):
                return CopiedLedger(rows=counts, already=True)
            if any(rows for _, rows in held.values()):
                found = ", ".join(f"{len(rows)} {table}" for table, (_, rows) in held.items() if rows)
                raise LedgerError(
                    f"the ledger database {backend.where} already holds another history ({found}); copying "
                    f"{source} would merge two histories of the run. Copy into an empty database, or keep "
                    "the run on its SQLite file"
                )
            _insert(database, history)
        return CopiedLedger(rows=counts, already=False)
    finally:
        database.close()


COPIED = tuple(table for table in TABLES if table != "write_tokens")
"""What a copy moves: everything but the tokens of the file's own writes (a PostgreSQL ledger's only)."""


def _files_into_rows(history: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    # The steps' arrays_path and samples_path become result_data rows (and NULL paths), as
    # `Ledger.record_metrics` stores a result on PostgreSQL. A missing file is the user's to find.
    columns, rows = history["steps"]
    at = {name: columns.index(name) for name in ("stream_id", "step", "arrays_path", "samples_path")}
    data_columns, data_rows = history["result_data"]
    data_rows = list(data_rows)
    steps = []
    for row in rows:
        try:
            data = folder_data(output_dir, row[at["arrays_path"]], row[at["samples_path"]])
        except OSError as error:
            raise LedgerError(
                f"step {row[at['step']]}'s stored result names a file that cannot be read ({error}); copy the "
                f"ledger from the output_dir that holds its results/ folder") from None
        for kind, body in data.items():
            named = {"stream_id": row[at["stream_id"]], "step": row[at["step"]], "kind": kind, "body": body}
            data_rows.append(tuple(named[name] for name in data_columns))
        steps.append(tuple(None if i in (at["arrays_path"], at["samples_path"]) else value
                           for i, value in enumerate(row)))
    return {**history, "steps": (columns, steps), "result_data": (data_columns, data_rows)}


def _rows(conn: Any, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    cursor = conn.execute(f"SELECT * FROM {table}")
    columns = [column[0] for column in cursor.description]
    # By name, so that the two backends' column orders (ALTER TABLE appends on SQLite) compare alike.
    order = sorted(range(len(columns)), key=lambda i: columns[i])
    # bytes, whichever buffer type the driver returns, so that the two backends' bodies compare alike.
    return sorted(columns), [tuple(bytes(row[i]) if isinstance(row[i], memoryview) else row[i] for i in order)
                             for row in cursor.fetchall()]


def _insert(database: PostgresConnection, history: dict[str, tuple[list[str], list[tuple[Any, ...]]]]) -> None:
    for table in COPIED:  # parents first: streams, steps, then what refers to them
        columns, rows = history[table]
        if table == "streams":
            # A run's stream may have a higher id than its suites' streams: parents are set after.
            parent = columns.index("parent_id")
            rows_now = [tuple(None if i == parent else v for i, v in enumerate(row)) for row in rows]
        else:
            rows_now = rows
        if rows_now:
            marks = ", ".join("?" * len(columns))
            database.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows_now)
        if table == "streams" and rows:
            stream = columns.index("stream_id")
            parents = [(row[parent], row[stream]) for row in rows if row[parent] is not None]
            if parents:
                database.executemany("UPDATE streams SET parent_id = ? WHERE stream_id = ?", parents)
            # New streams (another config, a new suite) continue after the copied ids.
            database.execute("SELECT setval(pg_get_serial_sequence('streams', 'stream_id'), "
                             "(SELECT MAX(stream_id) FROM streams))")
