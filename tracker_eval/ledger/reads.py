"""Reading the step record of a stream: states, stored results, the best step and the status rows.

    ledger.steps(StepState.PENDING)     # [100, 200]
    ledger.result(100)                  # the stored EvalResult, per-example arrays and samples included
    ledger.rows()                       # one dict per step, as `tracker-eval status` shows them

`StepReads` is a base of `tracker_eval.ledger.steps.Ledger`; it never writes.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.best import read_best
from tracker_eval.ledger.db import LedgerStore, read_snapshot, retried
from tracker_eval.ledger.files import decode_result, decoded_metrics, read_arrays, read_result_data, read_samples
from tracker_eval.redact import redact_text


class StepState(enum.StrEnum):
    """The state of one checkpoint step in the ledger."""

    PENDING = "pending"
    EVALUATING = "evaluating"
    EVALUATED = "evaluated"
    DELIVERED = "delivered"
    FAILED = "failed"  # retryable: claim() takes it again
    GIVEN_UP = "given_up"  # failed max_attempts times; terminal
    SKIPPED = "skipped"  # terminal, unless `tracker-eval retry --skipped` asks for the step


_CLAIMABLE = (StepState.PENDING, StepState.FAILED)
_STORED = (StepState.EVALUATED, StepState.DELIVERED)


class StepReads(LedgerStore):
    """Read-only queries over the steps of one stream."""

    def state(self, step: int) -> StepState | None:
        """The step's state, or None when the step is unknown."""
        row = self._row(self._conn(), step)
        return None if row is None else StepState(row["state"])

    def steps(self, *states: StepState | str) -> list[int]:
        """Known steps in ascending order, only those in `states` when any are given."""
        wanted = [StepState(s).value for s in states] or [s.value for s in StepState]
        marks = ", ".join("?" * len(wanted))
        rows = self._conn().execute(
            f"SELECT step FROM steps WHERE stream_id = ? AND state IN ({marks}) ORDER BY step",
            (self._stream, *wanted),
        )
        return [step for (step,) in rows]

    def newest_step(self) -> int | None:
        """The highest known step, whatever its state, or None when no step is known."""
        (newest,) = self._conn().execute(
            "SELECT MAX(step) FROM steps WHERE stream_id = ?", (self._stream,)
        ).fetchone()
        return newest


    def result(self, step: int) -> EvalResult | None:
        """The stored result of a step, per-example arrays and samples included, or None when none is stored."""
        row = self._row(self._conn(), step)
        if row is None or row["result_json"] is None:
            return None
        if row["arrays_path"] is None and row["samples_path"] is None:  # in the database (PostgreSQL), or none
            arrays, samples = read_result_data({kind: body for kind, body in self._conn().execute(
                "SELECT kind, body FROM result_data WHERE stream_id = ? AND step = ?", (self._stream, int(step)))})
        else:  # files under output_dir (SQLite)
            arrays = {} if row["arrays_path"] is None else read_arrays(self.output_dir / row["arrays_path"])
            samples = {} if row["samples_path"] is None else read_samples(self.output_dir / row["samples_path"])
        result = decode_result(row["result_json"], per_example=arrays, samples=samples)
        # The version is the stream's (the ledger counts it), not the evaluating process's.
        return dataclasses.replace(result, suite_version=self.suite_version)

    def best(self) -> tuple[int, float] | None:
        """The best step so far and its value of `best_metric` (NaN ignored), or None."""
        return read_best(self._conn(), self._stream)

    # Status.

    @retried
    def rows(self) -> list[dict[str, Any]]:
        """One dict per known step, ascending: step, state, reason, attempts, owner, metrics (scalars),
        deliveries (``{logger: "pending" | "delivered" | "undeliverable"}``) and delivery_errors
        (``{logger: last error}`` of deliveries not yet made that failed)."""
        conn = self._conn()
        with read_snapshot(conn):
            steps = conn.execute(
                "SELECT step, state, reason, attempts, owner, result_json FROM steps "
                "WHERE stream_id = ? ORDER BY step",
                (self._stream,),
            ).fetchall()
            outbox = conn.execute(
                "SELECT step, logger, state, last_error FROM outbox WHERE stream_id = ? ORDER BY logger",
                (self._stream,),
            ).fetchall()
        deliveries: dict[int, dict[str, str]] = {}
        errors: dict[int, dict[str, str]] = {}
        for step, logger, state, last_error in outbox:
            deliveries.setdefault(step, {})[logger] = state
            if state != "delivered" and last_error:
                # Masked on reading too: a ledger written by an older version may hold a credential.
                errors.setdefault(step, {})[logger] = redact_text(last_error)
        return [
            {
                "step": step,
                "state": StepState(state),
                "reason": redact_text(reason) if reason else reason,
                "attempts": attempts,
                "owner": owner,
                "metrics": {} if payload is None else decoded_metrics(payload),
                "deliveries": deliveries.get(step, {}),
                "delivery_errors": errors.get(step, {}),
            }
            for step, state, reason, attempts, owner, payload in steps
        ]

