"""Who evaluates a step: registering steps, claiming one under a lease, renewing and releasing it.

    if ledger.claim(100, owner=owner, ttl_s=30):     # pending/failed/stale -> evaluating
        ...                                         # renew(100, owner=owner) every ttl_s / 3
        ledger.record_metrics(result, owner=owner)  # (steps.Ledger) or release(100, owner=owner)

A claim is a lease in the step's row: a living holder renews it, a dead one (expired lease, or a
dead process of this host) is taken over, and every claim counts as an attempt.
"""

from __future__ import annotations

from collections.abc import Iterable

from tracker_eval.ledger.backend import Connection
from tracker_eval.ledger.db import retried, write_transaction
from tracker_eval.ledger.lease import lease_reclaimable
from tracker_eval.ledger.reads import _CLAIMABLE, StepReads, StepState


class Claims(StepReads):
    """The claim side of the step state machine (`tracker_eval.ledger.steps.Ledger` is built on it)."""

    _max_attempts: int

    def _insert_pending(self, conn: Connection, step: int) -> bool:
        cursor = conn.execute(
            "INSERT INTO steps (stream_id, step, state, updated_at) VALUES (?, ?, 'pending', ?) ON CONFLICT DO NOTHING",
            (self._stream, int(step), self._clock()),
        )
        return cursor.rowcount == 1

    @retried
    def register(self, steps: Iterable[int]) -> list[int]:
        """Adds steps not yet known as pending; known steps keep their state.

        Args:
          steps: checkpoint steps, in any order (a late, lower step is simply added).

        Returns:
          The newly added steps, ascending.
        """
        conn = self._conn()
        # A poll lists steps the ledger mostly knows: one read finds the new ones, and only they are
        # written (one statement each; a PostgreSQL ledger is a round trip away), under the write lock,
        # where a step another process added meanwhile is simply not added again.
        known = {step for (step,) in conn.execute("SELECT step FROM steps WHERE stream_id = ?", (self._stream,))}
        new = sorted({int(s) for s in steps} - known)
        if not new:
            return []
        with write_transaction(conn):
            added = [step for step in new if self._insert_pending(conn, step)]
        return added

    @retried
    def claim(self, step: int, *, owner: str, ttl_s: float = 30.0) -> bool:
        """Takes the step for evaluation: pending, retryable-failed or stale-evaluating -> evaluating.

        An evaluating step is stale when its lease expired or its owner is a dead process of this
        host. Each claim counts as an attempt; a stale step that has used up `max_attempts` (its
        evaluations keep dying) is given up instead. An unknown step is registered first.

        Args:
          step: the checkpoint step.
          owner: the claimant's id (`tracker_eval.ledger.lease.make_owner_id`).
          ttl_s: lease length; `renew` before it runs out.

        Returns:
          True when `owner` now holds the step (also when it already did), False otherwise.
        """
        conn = self._conn()
        now = self._clock()
        with write_transaction(conn):
            self._insert_pending(conn, step)
            row = self._row(conn, step)
            state, attempts, holder = StepState(row["state"]), row["attempts"], row["owner"]
            if state is StepState.EVALUATING and holder == owner:
                self._set(conn, step, lease_expires_at=now + ttl_s)
                return True
            stale = state is StepState.EVALUATING and lease_reclaimable(
                holder, expires_at=row["lease_expires_at"], now=now
            )
            if not (state in _CLAIMABLE or stale):
                return False
            reason = row["reason"]
            if stale:
                how = "expired" if row["lease_expires_at"] <= now else "its owner died"
                reason = f"took over from {holder}: lease {how}"
            if state is not StepState.PENDING and attempts >= self._max_attempts:
                self._set(conn, step, state=StepState.GIVEN_UP.value, owner=None, lease_expires_at=None,
                          reason=f"gave up after {attempts} attempts; last: {reason}")
                return False
            self._set(conn, step, state=StepState.EVALUATING.value, owner=owner,
                      lease_expires_at=now + ttl_s, attempts=attempts + 1, reason=reason)
            return True

    @retried
    def renew(self, step: int, *, owner: str, ttl_s: float = 30.0) -> bool:
        """Extends `owner`'s evaluation lease by `ttl_s` from now.

        Returns:
          False when `owner` no longer holds the step (stop evaluating it).
        """
        conn = self._conn()
        with write_transaction(conn):
            if not self._holds(conn, step, owner):
                return False
            self._set(conn, step, lease_expires_at=self._clock() + ttl_s)
            return True

    @retried
    def release(self, step: int, *, owner: str) -> bool:
        """Gives an unfinished evaluation back (e.g. on SIGTERM): evaluating -> pending.

        The abandoned attempt is not counted against `max_attempts`.

        Returns:
          False when `owner` did not hold the step.
        """
        conn = self._conn()
        with write_transaction(conn):
            if not self._holds(conn, step, owner):
                return False
            attempts = self._row(conn, step)["attempts"]
            self._set(conn, step, state=StepState.PENDING.value, owner=None, lease_expires_at=None,
                      attempts=max(attempts - 1, 0))
            return True

    def _holds(self, conn: Connection, step: int, owner: str) -> bool:
        # An expired lease still counts as held until someone else takes it over.
        row = self._row(conn, step)
        return row is not None and row["state"] == StepState.EVALUATING and row["owner"] == owner
