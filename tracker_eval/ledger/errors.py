"""The ledger's exceptions, shared by both backends (`tracker_eval.ledger.sqlite`, `tracker_eval.ledger.postgres`).

    try:
        ledger.record_metrics(result, owner=owner)
    except LeaseLostError:
        ...   # another process took the step over; drop this result
"""

from __future__ import annotations


class LedgerError(RuntimeError):
    """The ledger cannot be opened or a requested change is not allowed."""


class LeaseLostError(LedgerError):
    """The caller acts under a claim it no longer holds (it expired and was taken over, or was never held)."""


class IllegalTransitionError(LedgerError):
    """The requested change does not lead from the current state (e.g. skipping an evaluated step)."""


class DatabaseUnreachableError(LedgerError):
    """The ledger's database server does not answer (stopped, unreachable); at start a usage error,
    mid-run an outage to wait out (`tracker_eval.ledger.postgres`)."""


class TransactionLostError(LedgerError):
    """A write transaction's session was lost before it committed; nothing of it happened, and the
    server answers again: run the whole read-then-write again (`tracker_eval.ledger.db.retried`)."""
