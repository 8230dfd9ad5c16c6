"""The durable ledger: what happened to each checkpoint step, and which logger has seen its result.

One database (the SQLite file in ``output_dir``, or a PostgreSQL database that processes on many
machines share) holds, for each evaluation stream (checkpoint directory + eval config hash), every
step's state, its stored result, one outbox row per logger, leases, tracker run state and a
heartbeat. Every change is one transaction, so a process killed at any instant leaves a
consistent ledger; a crash replays delivery or (for an unfinished step) evaluation, never a
stored result. States of a step::

    pending -> evaluating -> evaluated -> delivered      (delivered: every logger has it; see outbox)
                        \\-> failed -> (claimed again) ... -> given_up      skipped (from any unfinished)
    skipped -> pending                                   (asked for: `tracker-eval retry --skipped`)

Usage:

    from tracker_eval.ledger.lease import make_owner_id
    ledger = Ledger("out", checkpoint_dir="/ckpt", config_hash="ab12", loggers=["console", "wandb"])
    ledger.register([100, 200])
    owner = make_owner_id()
    if ledger.claim(100, owner=owner):
        ledger.record_metrics(result, owner=owner)        # result: EvalResult of step 100
    if ledger.claim_logger("wandb", owner=owner):
        for step in ledger.due_deliveries("wandb"):
            send(ledger.result(step))
            ledger.mark_delivered(step, "wandb", owner=owner)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.backend import Connection
from tracker_eval.ledger.best import offer_best, reconcile_best
from tracker_eval.ledger.claims import Claims
from tracker_eval.ledger.db import IllegalTransitionError, LeaseLostError, LedgerError, retried, write_transaction
from tracker_eval.ledger.files import ResultFiles, encode_result, result_data, write_result_files
from tracker_eval.ledger.outbox import Outbox
from tracker_eval.ledger.reads import _STORED, StepState

__all__ = ["ASKED_FOR", "IllegalTransitionError", "Ledger", "LedgerError", "LeaseLostError", "StepState"]

_BEST_MODES = ("min", "max")
ASKED_FOR = "asked for by tracker-eval retry"
"""The reason of a pending step that `Ledger.ask_for_skipped` put back (a claim keeps it)."""


class Ledger(Outbox, Claims):
    """Durable per-step state, stored results and per-logger outbox of one evaluation stream.

    Safe to share between threads (one database connection per thread) and between processes (one
    writer at a time; claims decide who evaluates or delivers what). Delivery methods (`claim_logger`,
    `due_deliveries`, `mark_delivered`, ...) come from `tracker_eval.ledger.outbox.Outbox`, claims
    (`register`, `claim`, `renew`, `release`) from `tracker_eval.ledger.claims.Claims`; run state and
    heartbeat from `tracker_eval.ledger.db.LedgerStore`.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        checkpoint_dir: str | os.PathLike[str],
        config_hash: str,
        loggers: Sequence[str] = (),
        best_metric: str | None = None,
        best_mode: str = "min",
        max_attempts: int = 3,
        max_delivery_attempts: int = 5,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        run_hash: str | None = None,
        suite: str = "",
        earlier_hashes: Sequence[str] = (),
        url: str | None = None,
    ) -> None:
        """Opens (creating if needed) the ledger and binds it to one stream.

        Opening adds outbox rows for loggers that are new since the last run (for steps already
        evaluated), and moves steps between evaluated and delivered to match the logger set.

        Args:
          output_dir: directory for ``ledger.sqlite`` and ``results/``; created if missing.
          checkpoint_dir: the watched checkpoint directory (`tracker_eval.locations.normalize_checkpoint_dir`).
          config_hash: hash of the eval config; a changed config is a new stream.
          loggers: names of the configured loggers; a step is delivered once each of them has it.
          best_metric: scalar metric whose best step is tracked, or None.
          best_mode: "min" or "max": which value of `best_metric` is best.
          max_attempts: evaluation attempts of one step (claims, including crashed ones) before it
            is given up.
          max_delivery_attempts: failed deliveries of one result to one logger (outages excluded)
            before that delivery is marked undeliverable.
          backoff_base_s: delay after a logger's first failed delivery; doubles per failure.
          backoff_cap_s: longest delay between delivery attempts.
          busy_timeout_s: how long a write waits for another process's write.
          clock: source of unix time (tests pass a fake one).
          run_hash: the run's hash (`tracker_eval.identity.run_hash`) when this stream is one suite of a run:
            run state, delivery leases, summary marks and heartbeat are then the run's, shared.
          suite: the suite's name (recorded so `status` lists every suite the run ever had).
          earlier_hashes: hashes earlier releases gave this stream; one found is adopted as this
            stream (`tracker_eval.identity.earlier_suite_hashes`).
          url: a PostgreSQL database (``postgresql://USER@HOST:PORT/DB``) holding the ledger; None
            for the SQLite file ``<output_dir>/ledger.sqlite``. A PostgreSQL ledger also holds the
            results' arrays and samples (`record_metrics`).

        Raises:
          LedgerError: `output_dir` is not writable, or the ledger's database cannot be opened or
            written (the message names the fix).
          ConfigError: an argument is out of range.
        """
        if best_mode not in _BEST_MODES:
            raise ConfigError(f"best_mode={best_mode!r} is not one of {_BEST_MODES}")
        for key, value in (("max_attempts", max_attempts), ("max_delivery_attempts", max_delivery_attempts)):
            if value < 1:
                raise ConfigError(f"{key}={value} must be at least 1")
        if not 0 < backoff_base_s <= backoff_cap_s:
            raise ConfigError(
                f"need 0 < backoff_base_s <= backoff_cap_s, got {backoff_base_s} and {backoff_cap_s}"
            )
        super().__init__(output_dir, checkpoint_dir=checkpoint_dir, config_hash=config_hash, loggers=loggers,
                         busy_timeout_s=busy_timeout_s, clock=clock, run_hash=run_hash, suite=suite,
                         earlier_hashes=earlier_hashes, url=url)
        self._best = (best_metric, best_mode)
        self._max_attempts = max_attempts
        self._max_delivery_attempts = max_delivery_attempts
        self._backoff = (backoff_base_s, backoff_cap_s)
        conn = self._conn()
        with write_transaction(conn):
            self._reconcile_loggers(conn)
            reconcile_best(conn, self._stream, metric=best_metric, mode=best_mode)

    def __enter__(self) -> Ledger:
        return self

    # Evaluation: register, claim, renew and release come from `Claims`; record, fail, skip.

    @retried
    def record_metrics(self, result: EvalResult, *, owner: str) -> bool:
        """Stores a step's result and queues it for every configured logger, exactly once.

        The per-example arrays and per-sample records go where every process of the run can read
        them: a SQLite ledger writes them durably to ``results/`` in `output_dir` before its commit;
        a PostgreSQL ledger stores them in the database (``result_data``) in the same transaction,
        so that an evaluator on another machine can deliver them.

        Args:
          result: the finalized result; `result.step` names the step.
          owner: the claim holder.

        Returns:
          True when stored now; False when the step already had a stored result (it is kept,
          `result(step)` returns it).

        Raises:
          LeaseLostError: `owner` does not hold the step's claim and no result is stored.
          ValueError: the result cannot be stored (unserializable provenance, object arrays,
            samples that are not plain JSON).
        """
        step = int(result.step)
        conn = self._conn()
        if not self._may_record(conn, step, owner):  # saves writing arrays that would be dropped
            return False
        payload = encode_result(result)
        data = result_data(result) if self.data_in_database else {}
        files = ResultFiles() if self.data_in_database else write_result_files(
            self._results_dir, stem=f"{step:012d}", result=result)
        try:
            with write_transaction(conn):
                stored = self._may_record(conn, step, owner)
                if stored:
                    self._store(conn, result, payload, files)
                    self._store_data(conn, step, data)
        except BaseException:
            files.discard()
            raise
        if not stored:
            files.discard()
        return stored

    def _may_record(self, conn: Connection, step: int, owner: str) -> bool:
        row = self._row(conn, step)
        if row is not None and row["state"] in _STORED:
            return False
        if not self._holds(conn, step, owner):
            state = None if row is None else f"{row['state']} (holder {row['owner']})"
            raise LeaseLostError(
                f"step {step}: {owner} does not hold the evaluation claim (step is {state}); "
                "claim the step before recording, and renew the lease while evaluating"
            )
        return True

    def _store(self, conn: Connection, result: EvalResult, payload: str, files: ResultFiles) -> None:
        step = int(result.step)
        relative = {key: None if path is None else os.path.relpath(path, self.output_dir)
                    for key, path in (("arrays_path", files.arrays), ("samples_path", files.samples))}
        state = StepState.EVALUATED if self.loggers else StepState.DELIVERED
        self._set(conn, step, state=state.value, owner=None, lease_expires_at=None, reason=None,
                  result_json=payload, **relative)
        self._queue(conn, step)
        metric, mode = self._best
        if metric is not None and metric in result.metrics:
            offer_best(conn, self._stream, step=step, value=float(result.metrics[metric]), mode=mode)

    def _store_data(self, conn: Connection, step: int, data: dict[str, bytes]) -> None:
        if data:
            conn.executemany(
                "INSERT INTO result_data (stream_id, step, kind, body) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (stream_id, step, kind) DO UPDATE SET body = excluded.body",
                [(self._stream, step, kind, body) for kind, body in data.items()])

    @retried
    def mark_failed(self, step: int, reason: str, *, owner: str, max_attempts: int | None = None) -> StepState:
        """Ends `owner`'s evaluation attempt in failure: failed (retryable) or, out of attempts, given_up.

        Args:
          step: the checkpoint step.
          reason: what went wrong (kept for the status view).
          owner: the claim holder.
          max_attempts: overrides the ledger's `max_attempts` for this decision.

        Returns:
          The new state, `StepState.FAILED` or `StepState.GIVEN_UP`.

        Raises:
          LeaseLostError: `owner` does not hold the step's claim.
        """
        limit = self._max_attempts if max_attempts is None else max_attempts
        conn = self._conn()
        with write_transaction(conn):
            if not self._holds(conn, step, owner):
                raise LeaseLostError(f"step {step}: {owner} does not hold the claim; cannot mark it failed")
            attempts = self._row(conn, step)["attempts"]
            state = StepState.FAILED if attempts < limit else StepState.GIVEN_UP
            self._set(conn, step, state=state.value, owner=None, lease_expires_at=None, reason=reason)
            return state

    @retried
    def mark_skipped(self, step: int, reason: str, *, owner: str | None = None) -> None:
        """Marks a step not to be evaluated (registering it if unknown).

        Args:
          step: the checkpoint step.
          reason: why (kept for the status view).
          owner: required when the step is being evaluated: only its holder may skip it.

        Raises:
          IllegalTransitionError: the step already has a stored result.
          LeaseLostError: the step is being evaluated by someone other than `owner`.
        """
        conn = self._conn()
        with write_transaction(conn):
            self._insert_pending(conn, step)
            row = self._row(conn, step)
            if row["state"] in _STORED:
                raise IllegalTransitionError(
                    f"step {step} is {row['state']}: a stored result cannot be skipped"
                )
            if row["state"] == StepState.EVALUATING and row["owner"] != owner:
                raise LeaseLostError(
                    f"step {step} is being evaluated by {row['owner']}; only that owner may skip it"
                )
            self._set(conn, step, state=StepState.SKIPPED.value, owner=None, lease_expires_at=None,
                      reason=reason)


    @retried
    def ask_for_skipped(self, step: int | None = None) -> list[int]:
        """Skipped steps (every one, or just `step`) -> pending, marked as asked for (`ASKED_FOR`), so
        that no policy skips them again; the next watcher evaluates them.

        Returns:
          The steps now pending, ascending.
        """
        conn = self._conn()
        where = "" if step is None else " AND step = ?"
        with write_transaction(conn):
            steps = [row[0] for row in conn.execute(
                f"SELECT step FROM steps WHERE stream_id = ? AND state = 'skipped'{where} ORDER BY step",
                (self._stream, *(() if step is None else (int(step),))))]
            for found in steps:
                self._set(conn, found, state=StepState.PENDING.value, attempts=0, reason=ASKED_FOR)
        return steps

    def asked_for(self) -> set[int]:
        """Pending steps that `ask_for_skipped` put back: a policy leaves them alone."""
        rows = self._conn().execute("SELECT step FROM steps WHERE stream_id = ? AND state = 'pending' AND reason = ?",
                                    (self._stream, ASKED_FOR))
        return {row[0] for row in rows}
