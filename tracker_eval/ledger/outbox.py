"""The ledger's outbox: which logger still lacks which stored result, with leases and backoff.

Storing a result queues one outbox row per configured logger in the same transaction. A deliverer
takes the logger's lease, sends the due steps in step order and acknowledges each; a failure pushes
that row's next attempt back exponentially. A step is delivered once every configured logger has it.
`Outbox` is a base of `tracker_eval.ledger.steps.Ledger`, which is what callers construct.

    if ledger.claim_logger("wandb", owner=owner):
        for step in ledger.due_deliveries("wandb"):
            try:
                send(ledger.result(step))
            except OSError as error:
                ledger.mark_delivery_failed(step, "wandb", str(error), owner=owner)
            else:
                ledger.mark_delivered(step, "wandb", owner=owner)
"""

from __future__ import annotations

import sqlite3

from tracker_eval.ledger.db import IllegalTransitionError, LeaseLostError, LedgerStore, write_transaction
from tracker_eval.ledger.lease import lease_reclaimable


class Outbox(LedgerStore):
    """Per-logger delivery state of one stream; see the module docstring."""

    _backoff: tuple[float, float]  # (base, cap) seconds, set by Ledger

    def _pending_outbox_sql(self) -> str:
        # Correlated on the outer `steps` row; only configured loggers count toward "delivered".
        marks = ", ".join("?" * len(self.loggers))
        return (
            "SELECT 1 FROM outbox o WHERE o.stream_id = steps.stream_id AND o.step = steps.step "
            f"AND o.state = 'pending' AND o.logger IN ({marks})"
        )

    def _reconcile_loggers(self, conn: sqlite3.Connection) -> None:
        # Loggers new since the last run get every stored result; a removed logger no longer holds
        # steps back from "delivered", and a new one moves delivered steps back to "evaluated".
        now = self._clock()
        for logger in self.loggers:
            conn.execute(
                "INSERT OR IGNORE INTO outbox (stream_id, step, logger, state, next_attempt_at) "
                "SELECT stream_id, step, ?, 'pending', ? FROM steps "
                "WHERE stream_id = ? AND state IN ('evaluated', 'delivered')",
                (logger, now, self._stream),
            )
        pending = self._pending_outbox_sql()
        conn.execute(
            f"UPDATE steps SET state = 'evaluated', updated_at = ? "
            f"WHERE stream_id = ? AND state = 'delivered' AND EXISTS ({pending})",
            (now, self._stream, *self.loggers),
        )
        conn.execute(
            f"UPDATE steps SET state = 'delivered', updated_at = ? "
            f"WHERE stream_id = ? AND state = 'evaluated' AND NOT EXISTS ({pending})",
            (now, self._stream, *self.loggers),
        )

    def _queue(self, conn: sqlite3.Connection, step: int) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO outbox (stream_id, step, logger, state, next_attempt_at) "
            "VALUES (?, ?, ?, 'pending', ?)",
            [(self._stream, int(step), logger, self._clock()) for logger in self.loggers],
        )

    def claim_logger(self, logger: str, *, owner: str, ttl_s: float = 30.0) -> bool:
        """Takes (or renews) the right to deliver to `logger` for this stream.

        One deliverer per logger keeps each tracker's steps in order and stops two processes from
        sending the same step at once. The lease is taken over when expired or its owner is dead.

        Args:
          logger: a configured logger name.
          owner: the deliverer's id (`tracker_eval.ledger.lease.make_owner_id`).
          ttl_s: lease length; call again before it runs out to renew.

        Returns:
          True when `owner` now holds the logger's delivery lease.

        Raises:
          ValueError: `logger` is not configured.
        """
        self._check_logger(logger)
        conn = self._conn()
        now = self._clock()
        with write_transaction(conn):
            row = conn.execute(
                "SELECT owner, expires_at FROM leases WHERE stream_id = ? AND name = ?",
                (self._stream, _lease_name(logger)),
            ).fetchone()
            if row is not None and row[0] != owner and not lease_reclaimable(row[0], expires_at=row[1], now=now):
                return False
            conn.execute(
                "INSERT OR REPLACE INTO leases (stream_id, name, owner, expires_at) VALUES (?, ?, ?, ?)",
                (self._stream, _lease_name(logger), owner, now + ttl_s),
            )
            return True

    def release_logger(self, logger: str, *, owner: str) -> bool:
        """Gives up the delivery lease of `logger`; returns False when `owner` did not hold it."""
        conn = self._conn()
        with write_transaction(conn):
            cursor = conn.execute(
                "DELETE FROM leases WHERE stream_id = ? AND name = ? AND owner = ?",
                (self._stream, _lease_name(logger), owner),
            )
            return cursor.rowcount == 1

    def due_deliveries(self, logger: str) -> list[int]:
        """Steps whose result `logger` still lacks and whose next attempt is due, ascending.

        Raises:
          ValueError: `logger` is not configured.
        """
        now = self._clock()
        return [step for step, due_at in self.pending_deliveries(logger) if due_at <= now]

    def pending_deliveries(self, logger: str) -> list[tuple[int, float]]:
        """Every step `logger` still lacks with its next attempt time, ascending by step.

        A deliverer that keeps step order waits for the lowest one even while later steps are
        due, so a tracker that comes back receives its backlog in step order.

        Raises:
          ValueError: `logger` is not configured.
        """
        self._check_logger(logger)
        rows = self._conn().execute(
            "SELECT step, next_attempt_at FROM outbox WHERE stream_id = ? AND logger = ? AND state = 'pending' "
            "ORDER BY step",
            (self._stream, logger),
        )
        return [(int(step), float(when)) for step, when in rows]

    def next_delivery_at(self, logger: str) -> float | None:
        """Unix time of `logger`'s earliest pending delivery attempt (a deliverer sleeps until then)."""
        self._check_logger(logger)
        (when,) = self._conn().execute(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE stream_id = ? AND logger = ? AND state = 'pending'",
            (self._stream, logger),
        ).fetchone()
        return when

    def mark_delivered(self, step: int, logger: str, *, owner: str) -> bool:
        """Records that `logger` durably holds the step's result (after its flush returned).

        Args:
          step: the checkpoint step.
          logger: the logger name.
          owner: holder of the logger's delivery lease (`claim_logger`).

        Returns:
          True when marked now, False when it already was.

        Raises:
          LeaseLostError: `owner` does not hold the logger's delivery lease.
          IllegalTransitionError: the step has no result queued for `logger`.
        """
        conn = self._conn()
        now = self._clock()
        with write_transaction(conn):
            if self._outbox_state(conn, step, logger, owner) == "delivered":
                return False
            conn.execute(
                "UPDATE outbox SET state = 'delivered', delivered_at = ?, last_error = NULL "
                "WHERE stream_id = ? AND step = ? AND logger = ?",
                (now, self._stream, int(step), logger),
            )
            conn.execute(
                f"UPDATE steps SET state = 'delivered', updated_at = ? WHERE stream_id = ? AND step = ? "
                f"AND state = 'evaluated' AND NOT EXISTS ({self._pending_outbox_sql()})",
                (now, self._stream, int(step), *self.loggers),
            )
            return True

    def mark_delivery_failed(self, step: int, logger: str, reason: str, *, owner: str) -> float:
        """Records a failed delivery; the next attempt is due after an exponential backoff.

        Deliveries are never given up: a tracker outage delays them, and they resume afterwards.

        Args:
          step: the checkpoint step.
          logger: the logger name.
          reason: the error (kept for the status view).
          owner: holder of the logger's delivery lease.

        Returns:
          Seconds until the next attempt: ``min(backoff_cap_s, backoff_base_s * 2**(failures - 1))``.

        Raises:
          LeaseLostError: `owner` does not hold the logger's delivery lease.
          IllegalTransitionError: the step has no pending delivery for `logger`.
        """
        base, cap = self._backoff
        conn = self._conn()
        with write_transaction(conn):
            if self._outbox_state(conn, step, logger, owner) != "pending":
                raise IllegalTransitionError(f"step {step} is already delivered to {logger!r}")
            (attempts,) = conn.execute(
                "SELECT attempts FROM outbox WHERE stream_id = ? AND step = ? AND logger = ?",
                (self._stream, int(step), logger),
            ).fetchone()
            delay = min(cap, base * 2.0 ** min(attempts, 62))
            conn.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ? "
                "WHERE stream_id = ? AND step = ? AND logger = ?",
                (attempts + 1, self._clock() + delay, reason, self._stream, int(step), logger),
            )
            return delay

    def _outbox_state(self, conn: sqlite3.Connection, step: int, logger: str, owner: str) -> str:
        lease = conn.execute(
            "SELECT owner FROM leases WHERE stream_id = ? AND name = ?", (self._stream, _lease_name(logger))
        ).fetchone()
        # An expired lease still counts as held until someone else takes it over.
        if lease is None or lease[0] != owner:
            raise LeaseLostError(
                f"{owner} does not hold the delivery lease of logger {logger!r} (holder: "
                f"{None if lease is None else lease[0]}); call claim_logger first and renew it"
            )
        row = conn.execute(
            "SELECT state FROM outbox WHERE stream_id = ? AND step = ? AND logger = ?",
            (self._stream, int(step), logger),
        ).fetchone()
        if row is None:
            raise IllegalTransitionError(f"step {step} has no result queued for logger {logger!r}")
        return row[0]

    def _check_logger(self, logger: str) -> None:
        if logger not in self.loggers:
            raise ValueError(f"logger {logger!r} is not configured; configured: {list(self.loggers)}")


def _lease_name(logger: str) -> str:
    return f"deliver:{logger}"
