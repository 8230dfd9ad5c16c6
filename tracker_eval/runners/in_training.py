"""`InTrainingEvaluation`: the watcher's evaluation and loggers, called from a training loop.

    from tracker_eval import InTrainingEvaluation

    with InTrainingEvaluation.from_config("eval.yaml", overrides=["output_dir=runs/eval"]) as evaluation:
        for step in ...:
            ...
            checkpoint_manager.save(step, args=...)
            evaluation.after_checkpoint(step=step, train_state=state)

It evaluates the live params (no restore, one compile for the whole run) and records each step in
the same ledger as `tracker-eval watch` (same output_dir, checkpoint_dir and eval config), so a
watcher beside training skips steps evaluated here, and a step the watcher already evaluated is
returned from the ledger without evaluating again. Delivery follows the outbox rules: a tracker
outage never stops training; undelivered results are sent later by either side. With several
suites every suite evaluates the live params, each recorded in its own ledger stream, and
`after_checkpoint` returns their results by suite name. A suite's cadence holds here too: a step
that is not a multiple of its `every_n_steps` is recorded as skipped by policy, as the watcher
records it (`tracker-eval retry --skipped` asks for it later), and is not evaluated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax

from tracker_eval.config import EvalConfig, load_config, off_cadence
from tracker_eval.errors import one_line
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.evaluation.state import EvalState
from tracker_eval.runners import distributed
from tracker_eval.runners.claim import ClaimRenewal

LOG = logging.getLogger("tracker_eval")

_SKIP, _STORED = -1, -2


class InTrainingEvaluation:
    """Evaluates live train states after checkpoints and shares the watcher's ledger.

    Args:
      config: the same config a `tracker-eval watch` of this run uses.
      raise_on_error: re-raise evaluation failures instead of recording and warning.
      close_drain_s: how long `close()` waits for deliveries before leaving them in the outbox.
    """

    def __init__(self, config: EvalConfig, *, raise_on_error: bool = False, close_drain_s: float = 30.0) -> None:
        from tracker_eval.runners.pipeline import Components, Pipeline  # noqa: PLC0415

        self.config = config
        self.raise_on_error = raise_on_error
        self.close_drain_s = close_drain_s
        self.primary = distributed.is_primary()
        self.pipeline = Pipeline(config, components=Components.resolve(config), progress=False)
        self.channel = distributed.DecisionChannel(namespace=f"tracker_eval/{self.pipeline.stream_key}/in-training")
        self.ledger: Any = None
        self.delivery: Any = None
        self.session: Any = None
        if self.primary:
            self._open_primary()
        self._closed = False

    @classmethod
    def from_config(
        cls, path: str, *, overrides: Sequence[str] = (), **kwargs: Any
    ) -> InTrainingEvaluation:
        """Loads the YAML config (with `key=value` overrides) and builds the evaluation."""
        return cls(load_config(path, overrides=overrides), **kwargs)

    def _open_primary(self) -> None:
        from tracker_eval.runners.stream import PrimaryStream  # noqa: PLC0415

        self.stream = PrimaryStream.open(self.config)
        self.ledger, self.session, self.delivery = self.stream.ledger, self.stream.session, self.stream.delivery
        self.owner = self.stream.owner

    @property
    def compile_count(self) -> int:
        """Compilations of the eval steps in this process so far (1 per eval suite for a whole run)."""
        return sum(suite.evaluation.trace_count for suite in self.pipeline.suites.values()
                   if hasattr(suite, "evaluation"))

    def after_checkpoint(
        self,
        *,
        step: int,
        train_state: Any = None,
        params: Any = None,
        mutable_variables: Any = None,
    ) -> EvalResult | dict[str, EvalResult] | None:
        """Evaluates `step` now, unless the ledger already holds (or another process is evaluating) it.

        Every process of a multi-process job calls this; process 0 decides and records.

        Args:
          step: the training step just checkpointed.
          train_state: a flax TrainState-like object (params, optional batch_stats/mutable_variables).
          params: the params, when no train_state is given.
          mutable_variables: other collections, with `params`.

        Returns:
          The step's result (stored earlier or just evaluated); None when another process is
          evaluating it right now, its cadence (`watch.policy`) skips it, or the evaluation failed
          (recorded in the ledger, warned, and training goes on; with ``raise_on_error`` the error
          is raised instead). With suites, the results by suite name of those that have one (a
          suite that failed or whose cadence skips the step is left out; a failure is raised with
          ``raise_on_error``).
        """
        try:
            return self._after_checkpoint(step, train_state, params, mutable_variables)
        except Exception as error:
            # Nothing here may stop training: not the evaluation, not the ledger (disk full, a busy
            # file), not a bad train state. The step stays unevaluated for the watcher to retry.
            if self.raise_on_error:
                raise
            LOG.warning("tracker-eval: in-training evaluation of step %d failed: %s: %s",
                        step, type(error).__name__, one_line(error, limit=400))
            return None

    def _after_checkpoint(
        self, step: int, train_state: Any, params: Any, mutable_variables: Any
    ) -> EvalResult | dict[str, EvalResult] | None:
        if self.config.has_suites:
            return self._after_checkpoint_suites(step, self._live_state(step, train_state, params, mutable_variables))
        started = time.perf_counter()
        decision = self._decide(step) if self.primary else None
        decision = self.channel.exchange(decision)
        if decision == _STORED:
            return self.ledger.result(step) if self.primary else None
        if decision == _SKIP:
            return None
        # The claim lives as long as this process does, however long the evaluation takes: a
        # watcher beside training must not take the step over and evaluate it a second time.
        renewal = None
        if self.primary:
            renewal = ClaimRenewal(self.ledger, step, owner=self.owner, ttl_s=self.config.watch.lease_ttl_s)
        try:
            state = self._live_state(step, train_state, params, mutable_variables)
            result = self.pipeline.evaluate_state(state, checkpoint=self.pipeline.checkpoint_path(step),
                                                  attempt=self.channel.seq, source="in-training")
        except Exception as error:
            if self.primary:
                self._mark_failed(step, error)
            raise
        finally:
            if renewal is not None:
                renewal.stop()
        if not self.primary:
            return result
        spent = time.perf_counter() - started
        result = EvalResult(
            step=result.step, checkpoint=result.checkpoint, metrics=result.metrics,
            per_example=result.per_example, time=result.time,
            provenance={**result.provenance, "training_time_in_after_checkpoint_s": round(spent, 4)},
        )
        if not self._record(result):
            return None
        return result

    def _live_state(self, step: int, train_state: Any, params: Any, mutable_variables: Any) -> EvalState:
        if train_state is not None:
            state = EvalState.from_train_state(train_state=train_state, rng=jax.random.key(self.config.seed))
        else:
            state = EvalState.create(apply_fn=None, params=params, mutable_variables=mutable_variables,
                                     rng=jax.random.key(self.config.seed))
        return state.replace(step=step, apply_fn=self.pipeline.adapter.apply_fn)

    def _after_checkpoint_suites(self, step: int, state: EvalState) -> dict[str, EvalResult]:
        """Every suite whose ledger lacks `step` evaluates the live params; each is recorded in its own stream."""
        from tracker_eval.ledger.steps import StepState  # noqa: PLC0415

        names = [suite.name for suite in self.config.suites]
        mask = 0
        if self.primary:
            for i, name in enumerate(names):
                ledger = self.stream.ledgers[name]
                ledger.register([step])
                due = not self._skipped_by_policy(name, ledger, step)
                if due and ledger.claim(step, owner=self.owner, ttl_s=self.config.watch.lease_ttl_s):
                    mask |= 1 << i
        mask = self.channel.exchange(mask)
        claimed = [name for i, name in enumerate(names) if mask >> i & 1]
        renewals = [ClaimRenewal(self.stream.ledgers[name], step, owner=self.owner,
                                 ttl_s=self.config.watch.lease_ttl_s) for name in claimed] if self.primary else []
        try:
            outcomes = self.pipeline.evaluate_state_suites(
                state, checkpoint=self.pipeline.checkpoint_path(step), suites=claimed, attempt=self.channel.seq,
                source="in-training") if claimed else {}
        finally:
            for renewal in renewals:
                renewal.stop()
        results: dict[str, EvalResult] = {}
        failed = None
        for name, outcome in outcomes.items():
            if isinstance(outcome, Exception):
                failed = failed or outcome
                if self.primary:
                    self._mark_failed(step, outcome, suite=name)
                LOG.warning("tracker-eval: in-training evaluation of step %d suite %r failed: %s: %s", step, name,
                            type(outcome).__name__, one_line(outcome, limit=400))
            elif not self.primary or self._record(outcome):
                results[name] = outcome
        if self.primary:
            for name in names:
                ledger = self.stream.ledgers[name]
                if name not in results and ledger.state(step) in (StepState.EVALUATED, StepState.DELIVERED):
                    results[name] = ledger.result(step)
        if failed is not None and self.raise_on_error:
            raise failed
        return results

    def _record(self, result: EvalResult) -> bool:
        """Stores the result; False (with one warning) when another process took the step over."""
        from tracker_eval.ledger.steps import LeaseLostError  # noqa: PLC0415

        try:
            self.stream.record(result)
        except LeaseLostError as error:
            LOG.warning("tracker-eval: in-training result of step %d dropped: its claim was taken over: %s",
                        result.step, one_line(error, limit=300))
            return False
        return True

    def _mark_failed(self, step: int, error: Exception, *, suite: str = "") -> None:
        from tracker_eval.ledger.steps import LeaseLostError  # noqa: PLC0415

        ledger = self.stream.ledgers[suite] if suite else self.ledger
        try:
            ledger.mark_failed(step, f"{type(error).__name__}: {one_line(error, limit=400)}", owner=self.owner)
        except LeaseLostError:
            pass  # taken over meanwhile: the new holder's outcome counts; the error is still reported

    def _skipped_by_policy(self, name: str, ledger: Any, step: int) -> bool:
        """Process 0: records `step` as skipped for suite `name` when its cadence leaves it out (and no
        `retry --skipped` asked for it); True when it is skipped now."""
        from tracker_eval.ledger.steps import IllegalTransitionError, LeaseLostError  # noqa: PLC0415

        reason = off_cadence(*self.config.suite_policy(name), step)
        if reason is None or step in ledger.asked_for():
            return False
        try:
            ledger.mark_skipped(step, reason)
        except (IllegalTransitionError, LeaseLostError):
            return False  # stored, or being evaluated by another process: theirs
        return True

    def _decide(self, step: int) -> int:
        from tracker_eval.ledger.steps import StepState  # noqa: PLC0415

        self.ledger.register([step])
        if self.ledger.state(step) in (StepState.EVALUATED, StepState.DELIVERED):
            return _STORED
        if self._skipped_by_policy("", self.ledger, step):
            return _SKIP
        if self.ledger.claim(step, owner=self.owner, ttl_s=self.config.watch.lease_ttl_s):
            return step
        return _STORED if self.ledger.state(step) in (StepState.EVALUATED, StepState.DELIVERED) else _SKIP

    def close(self) -> None:
        """Waits up to `close_drain_s` for deliveries, then closes the loggers (the rest stays queued)."""
        if self._closed:
            return
        self._closed = True
        if not self.primary:
            return
        self.stream.close(drain_s=self.close_drain_s, close_timeout_s=30.0)
        self.stream.close_ledgers()

    def __enter__(self) -> InTrainingEvaluation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
