"""The ledger file's versioned schema and its in-place migration.

    migrate(conn, path)   # brings an older file up to SCHEMA_VERSION under the write lock

A new version appends its statements to `_MIGRATIONS`; an existing ledger is migrated when opened,
and a file written by a newer tracker-eval is refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


class SchemaError(RuntimeError):
    """The ledger file was written by a newer tracker-eval."""


SCHEMA_VERSION = 6

# Version N's statements turn a version N-1 file into version N; a new version appends here so
# that an existing ledger file is migrated in place when it is opened.
_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE streams (
      stream_id INTEGER PRIMARY KEY,
      checkpoint_dir TEXT NOT NULL,
      config_hash TEXT NOT NULL,
      best_metric TEXT,
      best_mode TEXT,
      best_step INTEGER,
      best_value REAL,
      UNIQUE (checkpoint_dir, config_hash)
    );
    CREATE TABLE steps (
      stream_id INTEGER NOT NULL REFERENCES streams (stream_id),
      step INTEGER NOT NULL,
      state TEXT NOT NULL CHECK (state IN
        ('pending', 'evaluating', 'evaluated', 'delivered', 'failed', 'given_up', 'skipped')),
      reason TEXT,
      attempts INTEGER NOT NULL DEFAULT 0,
      owner TEXT,
      lease_expires_at REAL,
      result_json TEXT,
      arrays_path TEXT,
      updated_at REAL NOT NULL,
      PRIMARY KEY (stream_id, step),
      CHECK ((state = 'evaluating') = (owner IS NOT NULL)),
      CHECK ((state IN ('evaluated', 'delivered')) = (result_json IS NOT NULL))
    );
    CREATE TABLE outbox (
      stream_id INTEGER NOT NULL,
      step INTEGER NOT NULL,
      logger TEXT NOT NULL,
      state TEXT NOT NULL CHECK (state IN ('pending', 'delivered')),
      attempts INTEGER NOT NULL DEFAULT 0,
      next_attempt_at REAL NOT NULL,
      last_error TEXT,
      delivered_at REAL,
      PRIMARY KEY (stream_id, step, logger),
      FOREIGN KEY (stream_id, step) REFERENCES steps (stream_id, step)
    );
    CREATE INDEX outbox_due ON outbox (stream_id, logger, state, step);
    CREATE TABLE leases (
      stream_id INTEGER NOT NULL,
      name TEXT NOT NULL,
      owner TEXT NOT NULL,
      expires_at REAL NOT NULL,
      PRIMARY KEY (stream_id, name)
    );
    CREATE TABLE run_state (
      stream_id INTEGER NOT NULL,
      logger TEXT NOT NULL,
      state_json TEXT NOT NULL,
      PRIMARY KEY (stream_id, logger)
    );
    CREATE TABLE meta (
      stream_id INTEGER NOT NULL,
      key TEXT NOT NULL,
      value TEXT NOT NULL,
      updated_at REAL NOT NULL,
      PRIMARY KEY (stream_id, key)
    );
    """,
    # Version 2: a delivery may be 'undeliverable' (the tracker refused it, or it failed
    # max_delivery_attempts times) so it no longer holds later steps back; `failures` counts the
    # failures that may be the result's fault (outages do not count); `sending_since` marks an
    # attempt that may have reached the tracker without being acknowledged, so a process taking
    # over reads back only those. SQLite cannot change a CHECK in place: the table is rebuilt.
    # A version-1 process left no marks, so every pending row is marked "maybe sent, time unknown".
    2: """
    CREATE TABLE outbox_v2 (
      stream_id INTEGER NOT NULL,
      step INTEGER NOT NULL,
      logger TEXT NOT NULL,
      state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'undeliverable')),
      attempts INTEGER NOT NULL DEFAULT 0,
      failures INTEGER NOT NULL DEFAULT 0,
      next_attempt_at REAL NOT NULL,
      last_error TEXT,
      delivered_at REAL,
      sending_since REAL,
      PRIMARY KEY (stream_id, step, logger),
      FOREIGN KEY (stream_id, step) REFERENCES steps (stream_id, step)
    );
    INSERT INTO outbox_v2 (stream_id, step, logger, state, attempts, failures, next_attempt_at, last_error,
                           delivered_at, sending_since)
      SELECT stream_id, step, logger, state, attempts, 0, next_attempt_at, last_error, delivered_at,
             CASE WHEN state = 'pending' THEN 0.0 END
      FROM outbox;
    DROP TABLE outbox;
    ALTER TABLE outbox_v2 RENAME TO outbox;
    CREATE INDEX outbox_due ON outbox (stream_id, logger, state, step);
    """,
    # Version 3: a stored result may have per-sample records (e.g. lm-eval's samples of a suite),
    # a folder beside the ledger like the per-example arrays; results stored before have none.
    3: """
    ALTER TABLE steps ADD COLUMN samples_path TEXT;
    """,
    # Version 4: evaluation suites. Each suite of a run is a stream of its own (its steps, outbox
    # and best); `parent_id` names the run's stream (checkpoint_dir + the hash of the shared
    # fields), which holds what the suites share: tracker run state, delivery leases, the summary
    # mark and the heartbeat. `suite` is the suite's name, so a removed suite stays listed.
    # Streams of configs without suites have neither.
    4: """
    ALTER TABLE streams ADD COLUMN parent_id INTEGER REFERENCES streams (stream_id);
    ALTER TABLE streams ADD COLUMN suite TEXT;
    CREATE INDEX streams_parent ON streams (parent_id, suite)
    """,
    # Version 5: suite versions (`tracker_eval.identity`). A suite stream after the first of its
    # name in a run is a later version, delivered under keys of its own (``<suite>-vN``). Before,
    # its results went under the first version's keys, where loggers skipped the steps they held
    # and acknowledged them: such deliveries are queued again, as never sent. (The next open moves
    # their steps from delivered back to evaluated.)
    5: """
    UPDATE outbox SET state = 'pending', attempts = 0, failures = 0, next_attempt_at = 0, last_error = NULL,
      delivered_at = NULL, sending_since = NULL
    WHERE state = 'delivered' AND stream_id IN (
      SELECT later.stream_id FROM streams later JOIN streams earlier
        ON earlier.parent_id = later.parent_id AND earlier.suite = later.suite AND earlier.stream_id < later.stream_id
      WHERE later.parent_id IS NOT NULL)
    """,
    # Version 6: ledgers shared between machines (PostgreSQL). `result_data` holds a stored
    # result's per-example arrays (an .npz archive) and per-sample records, so that any evaluator
    # can deliver what another evaluated without a shared disk; a SQLite ledger keeps them as files
    # in output_dir and leaves the table empty. `write_tokens` names each committed write
    # transaction of a PostgreSQL ledger, so that a write whose COMMIT went unanswered (the
    # connection dropped) is known to have happened or not, and is never applied twice.
    6: """
    CREATE TABLE result_data (
      stream_id INTEGER NOT NULL,
      step INTEGER NOT NULL,
      kind TEXT NOT NULL CHECK (kind IN ('arrays', 'samples')),
      body BLOB NOT NULL,
      PRIMARY KEY (stream_id, step, kind),
      FOREIGN KEY (stream_id, step) REFERENCES steps (stream_id, step)
    );
    CREATE TABLE write_tokens (
      token TEXT PRIMARY KEY,
      committed_at REAL NOT NULL
    )
    """,
}


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Upgrades the file to `SCHEMA_VERSION` in one transaction (a no-op when it is current).

    Raises:
      SchemaError: the file has a newer schema than this version understands.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the ledger {path} has schema version {version}, newer than this tracker-eval "
                f"understands ({SCHEMA_VERSION}); upgrade tracker-eval or use another output_dir"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
