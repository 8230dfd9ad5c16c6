"""The ledger's outbox: which logger still lacks which stored result, with backoff and give-up.

Storing a result queues one outbox row per configured logger in the same transaction. A deliverer
takes the logger's lease (`tracker_eval.ledger.logger_lease`), marks the attempt begun, sends the
due steps in step order and acknowledges each; a failure pushes that row's next attempt back
exponentially. A row is ``pending``, ``delivered`` or ``undeliverable`` (the tracker refused it, or
it failed `max_delivery_attempts` times; it no longer holds later steps back, and
`requeue_undeliverable` makes it pending again). A step is delivered once every configured logger
has it. `Outbox` is a base of `tracker_eval.ledger.steps.Ledger`, which is what callers construct.

    if ledger.claim_logger("wandb", owner=owner):
        for step in ledger.due_deliveries("wandb"):
            ledger.begin_delivery(step, "wandb", owner=owner)
            try:
                send(ledger.result(step))
            except OSError as error:
                ledger.mark_delivery_failed(step, "wandb", str(error), owner=owner)
            else:
                ledger.mark_delivered(step, "wandb", owner=owner)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tracker_eval.ledger.backend import Connection
from tracker_eval.ledger.db import IllegalTransitionError, retried, write_transaction
from tracker_eval.ledger.logger_lease import LoggerLeases
from tracker_eval.redact import redact_text


class Outbox(LoggerLeases):
    """Per-logger delivery state of one stream; see the module docstring."""

    _backoff: tuple[float, float]  # (base, cap) seconds, set by Ledger
    _max_delivery_attempts: int  # set by Ledger

    def _pending_outbox_sql(self) -> str:
        # Correlated on the outer `steps` row; only configured loggers count toward "delivered",
        # and an undeliverable row keeps its step "evaluated" (stored, not everywhere).
        # PostgreSQL refuses an empty IN (), which SQLite reads as false: without loggers, say false.
        among = f"o.logger IN ({', '.join('?' * len(self.loggers))})" if self.loggers else "1 = 0"
        return (
            "SELECT 1 FROM outbox o WHERE o.stream_id = steps.stream_id AND o.step = steps.step "
            f"AND o.state != 'delivered' AND {among}"
        )

    def _reconcile_loggers(self, conn: Connection) -> None:
        # Loggers new since the last run get every stored result; a removed logger no longer holds
        # steps back from "delivered", and a new one moves delivered steps back to "evaluated".
        now = self._clock()
        for logger in self.loggers:
            conn.execute(
                "INSERT INTO outbox (stream_id, step, logger, state, next_attempt_at) "
                "SELECT stream_id, step, ?, 'pending', ? FROM steps "
                "WHERE stream_id = ? AND state IN ('evaluated', 'delivered') ON CONFLICT DO NOTHING",
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

    def _queue(self, conn: Connection, step: int) -> None:
        # A row already there starts afresh, every other column back at its default.
        conn.executemany(
            "INSERT INTO outbox (stream_id, step, logger, state, next_attempt_at) VALUES (?, ?, ?, 'pending', ?) "
            "ON CONFLICT (stream_id, step, logger) DO UPDATE SET state = 'pending', "
            "next_attempt_at = excluded.next_attempt_at, attempts = 0, failures = 0, last_error = NULL, "
            "delivered_at = NULL, sending_since = NULL",
            [(self._stream, int(step), logger, self._clock()) for logger in self.loggers],
        )

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

    @retried
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
                "UPDATE outbox SET state = 'delivered', delivered_at = ?, last_error = NULL, sending_since = NULL "
                "WHERE stream_id = ? AND step = ? AND logger = ?",
                (now, self._stream, int(step), logger),
            )
            conn.execute(
                f"UPDATE steps SET state = 'delivered', updated_at = ? WHERE stream_id = ? AND step = ? "
                f"AND state = 'evaluated' AND NOT EXISTS ({self._pending_outbox_sql()})",
                (now, self._stream, int(step), *self.loggers),
            )
            return True

    @retried
    def begin_delivery(self, step: int, logger: str, *, owner: str) -> None:
        """Marks that an attempt to send the step to `logger` starts now (call just before sending).

        The mark stays until the step is acknowledged: a failed, timed-out or killed attempt may
        still have reached the tracker, and a process taking the logger over reads back only the
        steps so marked (`in_flight_deliveries`).

        Raises:
          LeaseLostError: `owner` does not hold the logger's delivery lease.
          IllegalTransitionError: the step has no result queued for `logger`.
        """
        conn = self._conn()
        with write_transaction(conn):
            self._outbox_state(conn, step, logger, owner)
            conn.execute(
                "UPDATE outbox SET sending_since = COALESCE(sending_since, ?) "
                "WHERE stream_id = ? AND step = ? AND logger = ? AND state != 'delivered'",
                (self._clock(), self._stream, int(step), logger),
            )

    def in_flight_deliveries(self, logger: str) -> dict[int, float]:
        """Unacknowledged steps whose sending to `logger` began: step -> unix time of the first attempt.

        0.0 means "maybe sent, time unknown" (rows of a ledger written before attempts were marked).
        """
        self._check_logger(logger)
        rows = self._conn().execute(
            "SELECT step, sending_since FROM outbox WHERE stream_id = ? AND logger = ? AND state != 'delivered' "
            "AND sending_since IS NOT NULL ORDER BY step",
            (self._stream, logger),
        )
        return {int(step): float(since) for step, since in rows}

    @retried
    def mark_delivery_failed(
        self, step: int, logger: str, reason: str, *, owner: str, counted: bool = True, permanent: bool = False
    ) -> float:
        """Records a failed delivery: retried after an exponential backoff, or undeliverable.

        A tracker outage (`counted=False`) only delays: the backlog resumes, in step order, when it
        is back. A failure that may be the result's fault counts; after `max_delivery_attempts` of
        them, or at once when `permanent`, the delivery is undeliverable: it no longer holds later
        steps back, and only `requeue_undeliverable` (``tracker-eval retry``) sends it again.

        Args:
          step: the checkpoint step.
          logger: the logger name.
          reason: the error (kept for the status view, credentials masked).
          owner: holder of the logger's delivery lease.
          counted: whether this failure counts toward `max_delivery_attempts`.
          permanent: the tracker will never accept this result as it is.

        Returns:
          Seconds until the next attempt, ``min(backoff_cap_s, backoff_base_s * 2**(attempts - 1))``,
          or ``math.inf`` when the delivery became undeliverable.

        Raises:
          LeaseLostError: `owner` does not hold the logger's delivery lease.
          IllegalTransitionError: the step has no pending delivery for `logger`.
        """
        base, cap = self._backoff
        reason = redact_text(reason)  # what a tracker said may quote its URL with credentials
        conn = self._conn()
        with write_transaction(conn):
            state = self._outbox_state(conn, step, logger, owner)
            if state != "pending":
                raise IllegalTransitionError(f"step {step} is already {state} to {logger!r}")
            attempts, failures = conn.execute(
                "SELECT attempts, failures FROM outbox WHERE stream_id = ? AND step = ? AND logger = ?",
                (self._stream, int(step), logger),
            ).fetchone()
            failures += 1 if counted or permanent else 0
            undeliverable = permanent or failures >= self._max_delivery_attempts
            delay = math.inf if undeliverable else min(cap, base * 2.0 ** min(attempts, 62))
            if undeliverable:
                why = "refused" if permanent else f"failed {failures} times"
                reason = f"{why}: {reason}"
            conn.execute(
                "UPDATE outbox SET state = ?, attempts = ?, failures = ?, next_attempt_at = ?, last_error = ? "
                "WHERE stream_id = ? AND step = ? AND logger = ?",
                ("undeliverable" if undeliverable else "pending", attempts + 1, failures,
                 self._clock() + (0.0 if undeliverable else delay), reason, self._stream, int(step), logger),
            )
            return delay

    @retried
    def requeue_undeliverable(self, *, step: int | None = None, logger: str | None = None) -> list[tuple[int, str]]:
        """Makes undeliverable deliveries pending again, due now, with fresh attempt counts.

        Safe while a watcher runs: one transaction, and its deliverers pick the rows up on their
        next look at the outbox.

        Args:
          step: only this step (default all).
          logger: only this logger (default all configured ones).

        Returns:
          The (step, logger) pairs queued again, ascending.

        Raises:
          ValueError: `logger` is not configured.
        """
        if logger is not None:
            self._check_logger(logger)
        names: Sequence[str] = self.loggers if logger is None else (logger,)
        if not names:
            return []
        marks = ", ".join("?" * len(names))
        where = f"stream_id = ? AND state = 'undeliverable' AND logger IN ({marks})"
        args: list[object] = [self._stream, *names]
        if step is not None:
            where += " AND step = ?"
            args.append(int(step))
        conn = self._conn()
        with write_transaction(conn):
            rows = conn.execute(f"SELECT step, logger FROM outbox WHERE {where} ORDER BY step, logger", args)
            found = [(int(s), str(name)) for s, name in rows]
            conn.execute(
                f"UPDATE outbox SET state = 'pending', attempts = 0, failures = 0, next_attempt_at = ?, "
                f"last_error = NULL WHERE {where}",
                [self._clock(), *args],
            )
        return found

    def _outbox_state(self, conn: Connection, step: int, logger: str, owner: str) -> str:
        self._check_lease(conn, logger, owner)
        row = conn.execute(
            "SELECT state FROM outbox WHERE stream_id = ? AND step = ? AND logger = ?",
            (self._stream, int(step), logger),
        ).fetchone()
        if row is None:
            raise IllegalTransitionError(f"step {step} has no result queued for logger {logger!r}")
        return row[0]
