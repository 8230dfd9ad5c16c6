"""The ledger: the durable record of each checkpoint step and of which tracker holds its result.

One SQLite file per output directory (`sqlite`), or one PostgreSQL database that processes on many
machines share (`postgres`, its tables in `postgres_schema`), behind the seam `backend`. `db`
(transactions, the stream handle), `errors` and `schema` (versioned tables) store it; `steps` is
the step state machine (record, fail, skip) on `claims` (register, claim, renew, release) and
`reads` its read side; `view` opens it read-only (status); `outbox` tracks delivery per logger
(pending, delivered, undeliverable) and `logger_lease` who delivers to each logger; `lease` tells
a dead holder; `files` keeps per-example arrays and exact JSON in ``output_dir``; `best` the best
step; `answers` keeps a suite's partial answers of one (step, suite) in ``answers.sqlite`` in
``output_dir``, so a later attempt continues.

May import: the shared top level and evaluation (EvalResult).
Public names: Ledger, StepState, LedgerError, LeaseLostError, IllegalTransitionError, LeaseClaim,
make_owner_id.
"""

from tracker_eval.imports import lazy_exports

_EXPORTS = {
    "Ledger": "steps",
    "StepState": "reads",
    "LedgerError": "db",
    "LeaseLostError": "db",
    "IllegalTransitionError": "db",
    "LeaseClaim": "lease",
    "make_owner_id": "lease",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
