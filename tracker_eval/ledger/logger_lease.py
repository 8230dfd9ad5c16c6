"""Who delivers to each logger: one lease per logger and stream, and what its holder last summarized.

One deliverer per logger keeps each tracker's steps in order and stops two processes from sending
the same step at once. Everything sent to a tracker is sent under its lease: results (the outbox)
and the best-checkpoint summary, so the summary a tracker ends with is the one its last holder read
from the ledger, never an older one that arrived late. `LoggerLeases` is a base of
`tracker_eval.ledger.outbox.Outbox`.

    claim = ledger.claim_logger("wandb", owner=owner)      # LeaseClaim.ACQUIRED / RENEWED / REFUSED
    if claim is LeaseClaim.ACQUIRED:
        ...                                                # learn again what the tracker holds
    if ledger.summary_sent("wandb") != text:
        send(text); ledger.mark_summary_sent("wandb", text, owner=owner)
"""

from __future__ import annotations

from tracker_eval.ledger.backend import Connection
from tracker_eval.ledger.db import LeaseLostError, LedgerStore, retried, write_transaction
from tracker_eval.ledger.lease import LeaseClaim, lease_reclaimable


class LoggerLeases(LedgerStore):
    """Per-logger delivery leases and summary marks of one stream; see the module docstring."""

    @retried
    def claim_logger(self, logger: str, *, owner: str, ttl_s: float = 30.0) -> LeaseClaim:
        """Takes (or renews) the right to deliver to `logger` for this stream.

        The lease is taken over when expired or its owner is dead.

        Args:
          logger: a configured logger name.
          owner: the deliverer's id (`tracker_eval.ledger.lease.make_owner_id`).
          ttl_s: lease length; call again before it runs out to renew.

        Returns:
          ACQUIRED when `owner` holds the lease now and did not hold it without a break until now
          (it must then learn again what the tracker holds: another process may have sent
          meanwhile), RENEWED when it did, REFUSED when another live owner holds it. Only REFUSED
          is false.

        Raises:
          ValueError: `logger` is not configured.
        """
        self._check_logger(logger)
        conn = self._conn()
        now = self._clock()
        with write_transaction(conn):
            row = conn.execute(
                "SELECT owner, expires_at FROM leases WHERE stream_id = ? AND name = ?",
                (self._run_stream, _lease_name(logger)),
            ).fetchone()
            if row is not None and row[0] != owner and not lease_reclaimable(row[0], expires_at=row[1], now=now):
                return LeaseClaim.REFUSED
            conn.execute(
                "INSERT INTO leases (stream_id, name, owner, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (stream_id, name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                (self._run_stream, _lease_name(logger), owner, now + ttl_s),
            )
            # An expired lease still counts as held until someone else takes it over: nobody sent.
            return LeaseClaim.RENEWED if row is not None and row[0] == owner else LeaseClaim.ACQUIRED

    @retried
    def release_logger(self, logger: str, *, owner: str) -> bool:
        """Gives up the delivery lease of `logger`; returns False when `owner` did not hold it."""
        conn = self._conn()
        with write_transaction(conn):
            cursor = conn.execute(
                "DELETE FROM leases WHERE stream_id = ? AND name = ? AND owner = ?",
                (self._run_stream, _lease_name(logger), owner),
            )
            return cursor.rowcount == 1

    def summary_sent(self, logger: str) -> str | None:
        """The summary (as its holder encoded it) that `logger`'s tracker was last given, or None."""
        row = self._conn().execute(
            "SELECT value FROM meta WHERE stream_id = ? AND key = ?", (self._run_stream, _summary_key(logger))
        ).fetchone()
        return None if row is None else row[0]

    @retried
    def mark_summary_sent(self, logger: str, text: str, *, owner: str) -> None:
        """Records that `logger`'s tracker durably holds the summary `text`.

        Raises:
          LeaseLostError: `owner` does not hold the logger's delivery lease.
        """
        conn = self._conn()
        with write_transaction(conn):
            self._check_lease(conn, logger, owner)
            conn.execute(
                "INSERT INTO meta (stream_id, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (stream_id, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (self._run_stream, _summary_key(logger), text, self._clock()),
            )

    def _check_lease(self, conn: Connection, logger: str, owner: str) -> None:
        lease = conn.execute(
            "SELECT owner FROM leases WHERE stream_id = ? AND name = ?", (self._run_stream, _lease_name(logger))
        ).fetchone()
        # An expired lease still counts as held until someone else takes it over.
        if lease is None or lease[0] != owner:
            raise LeaseLostError(
                f"{owner} does not hold the delivery lease of logger {logger!r} (holder: "
                f"{None if lease is None else lease[0]}); call claim_logger first and renew it"
            )

    def _check_logger(self, logger: str) -> None:
        if logger not in self.loggers:
            raise ValueError(f"logger {logger!r} is not configured; configured: {list(self.loggers)}")


def _lease_name(logger: str) -> str:
    return f"deliver:{logger}"


def _summary_key(logger: str) -> str:
    return f"summary:{logger}"
