"""`tracker-eval watch`: evaluate every new finalized checkpoint once and deliver every result once.

    watcher = Watcher(load_config("configs/watch.yaml"))
    exit_code = watcher.run()     # until watch.until_step, watch.idle_timeout_s or SIGTERM/SIGINT

Process 0 lists checkpoints, applies each suite's policy and `watch.order`, claims a step in the ledger and tells
every process which step to evaluate; all processes restore and evaluate it; process 0 records
the metrics in the ledger before any logger sees them, and per-logger delivery threads empty the
outbox in step order, through tracker outages and restarts.

With several suites, each suite's ledger stream has its own steps: process 0 claims a step in every
suite where it is due under that suite's policy (a suite added later is due on the steps the others
have done), the step is restored once, and only the claimed suites evaluate it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tracker_eval.config import EvalConfig, load_config
from tracker_eval.errors import one_line
from tracker_eval.runners import distributed
from tracker_eval.runners.claim import ClaimRenewal
from tracker_eval.runners.schedule import Schedule

LOG = logging.getLogger("tracker_eval")

IDLE, STOP = -1, -2
_STOP_DRAIN_S = 3.0


def run_watch(config_path: str, *, overrides: Sequence[str] = ()) -> int:
    """Entry point of `tracker-eval watch`; returns the exit code."""
    from tracker_eval.checkpoints.remote import bound_storage_waits  # noqa: PLC0415
    from tracker_eval.runners.pipeline import Components  # noqa: PLC0415

    config = load_config(config_path, overrides=overrides)
    components = Components.resolve(config)  # a typo fails now, not after waiting for peers
    bound_storage_waits(config.checkpoint_dir)  # a dead bucket fails a restore in seconds; retried later
    distributed.initialize(config.distributed)
    watcher = Watcher(config, components=components)
    watcher.install_signal_handlers()
    code = watcher.run()
    distributed.leave()
    # Everything is closed and written. The interpreter's last garbage collection at exit took ~6 s
    # of a 2-process harness job's stop on 2 cores (8 s from SIGTERM to exit, 1.6 s with this):
    # what is still allocated is freed with the process instead.
    gc.freeze()
    return code


class Watcher:
    """The watch loop over one checkpoint directory and eval config."""

    def __init__(self, config: EvalConfig, *, components: Any = None) -> None:
        from tracker_eval.runners.pipeline import Components, Pipeline  # noqa: PLC0415

        self.config = config
        self.watch = config.watch
        self.stop_requested = threading.Event()
        self.stop_reason = ""
        self.primary = distributed.is_primary()
        components = components or Components.resolve(config)
        self.ledger: Any = None
        self.session: Any = None
        self.delivery: Any = None
        self.events: Any = None
        self.poller: Any = None
        self.ledgers: dict[str, Any] = {}
        if self.primary:
            self._open_primary()
        self.schedule = Schedule(config, self.ledgers)
        self.pipeline = Pipeline(config, components=components)
        self.pipeline.set_should_abort(self.stop_requested.is_set)
        self.channel = distributed.DecisionChannel(namespace=f"tracker_eval/{self.pipeline.stream_key}/decisions")

    def _open_primary(self) -> None:
        from tracker_eval.checkpoints.fswatch import DirectoryEvents  # noqa: PLC0415
        from tracker_eval.checkpoints.roots import configured_names  # noqa: PLC0415
        from tracker_eval.runners.polling import StepPoller  # noqa: PLC0415
        from tracker_eval.runners.stream import PrimaryStream  # noqa: PLC0415

        # First: a gs:// root without credentials is a config error before any logger starts.
        self.poller = StepPoller(self.config.checkpoint_dir, poll_interval_s=self.watch.poll_interval_s,
                                 step_names=configured_names(self.config.checkpoint))
        self.stream = PrimaryStream.open(self.config)
        self.ledger, self.session, self.delivery = self.stream.ledger, self.stream.session, self.stream.delivery
        self.ledgers = self.stream.ledgers
        self.owner = self.stream.owner
        self.events = DirectoryEvents(self.config.checkpoint_dir, enabled=self.watch.fast_path)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop; the current evaluation is abandoned between batches."""

        def handler(signum: int, frame: Any) -> None:
            del frame
            self.request_stop(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_requested.set()

    def run(self) -> int:
        """Runs until a stop condition; returns the exit code (0 for every orderly stop)."""
        self._last_new = time.monotonic()  # idle time counts from the start
        if self.primary:
            LOG.info("tracker-eval: watching %s (policy %s, %s, every %.3g s%s)", self.config.checkpoint_dir,
                     self.schedule.policy_text(), self.watch.order.replace("_", " "),
                     self.watch.poll_interval_s, ", fast path on" if self.events.active else "")
        try:
            while True:
                decision = self._decide() if self.primary else None
                decision = self.channel.exchange(decision, alive=lambda: not self.stop_requested.is_set())
                if decision == STOP:
                    break
                if decision >= 0:
                    self._evaluate(*self.schedule.decode(decision))
                elif self.primary:
                    self._wait()
        finally:
            if self.primary:
                self._shutdown()
        return 0

    def _decide(self) -> int:
        ledger = self.ledger
        ledger.touch_heartbeat(self.owner)
        if self.stop_requested.is_set():
            return STOP
        listed = self.poller.poll()
        # While the storage does not answer nothing is claimed: a restore would only fail and use
        # up the step's attempts. An outage is not the end of training: idle time restarts after it.
        if listed is None:
            self._last_new = time.monotonic()
        else:
            if self.schedule.register(listed):
                self._last_new = time.monotonic()
            decision = self.schedule.claim_next(owner=self.owner)
            if decision is not None:
                return decision
        reason = self.schedule.finished(last_new=self._last_new)
        if reason:
            self.request_stop(reason)
            return STOP
        return IDLE

    def _wait(self) -> None:
        deadline = time.monotonic() + self.watch.poll_interval_s
        while not self.stop_requested.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # Short slices so a signal or a finished delivery is noticed quickly.
            if self.events.wait(min(left, 0.5)):
                return
            if self.watch.until_step is not None and self.schedule.finished(last_new=self._last_new):
                return

    def _evaluate(self, step: int, names: list[str]) -> None:
        import jax  # noqa: PLC0415

        from tracker_eval.checkpoints.tree import CheckpointUnreachableError, CheckpointVanishedError  # noqa: PLC0415
        from tracker_eval.evaluation.evaluator import EvalAborted  # noqa: PLC0415

        LOG.info("tracker-eval: evaluating step %d%s", step, _suites_text(names))
        renewals = []
        if self.primary:
            renewals = [ClaimRenewal(self.ledgers[name], step, owner=self.owner, ttl_s=self.watch.lease_ttl_s,
                                     heartbeat=i == 0) for i, name in enumerate(names)]
        try:
            # The decision's number names this attempt in the key-value store on every process.
            if self.config.has_suites:
                outcomes = self.pipeline.evaluate_suites(step, suites=names, attempt=self.channel.seq)
            else:
                outcomes = {"": self.pipeline.evaluate_step(step, attempt=self.channel.seq)}
        except EvalAborted:
            if self.primary:
                for name in names:
                    self.ledgers[name].release(step, owner=self.owner)
            LOG.info("tracker-eval: evaluation of step %d abandoned (%s)", step, self.stop_reason or "stop")
            return
        except CheckpointVanishedError as error:
            if self.primary:
                for name in names:
                    with self._claim_kept(step):
                        self.ledgers[name].mark_skipped(step, one_line(error, limit=400), owner=self.owner)
            LOG.warning("tracker-eval: step %d skipped: %s", step, one_line(error, limit=400))
            return
        except CheckpointUnreachableError as error:
            if self.primary:  # not the checkpoint's fault: the attempt is given back
                for name in names:
                    self.ledgers[name].release(step, owner=self.owner)
                self.poller.failed_elsewhere(error)
            LOG.warning("tracker-eval: step %d not read, storage unreachable (will retry): %s", step,
                        one_line(error, limit=400))
            return
        except Exception as error:  # noqa: BLE001 - one bad checkpoint must not stop the watcher
            outcomes = dict.fromkeys(names, error)
        finally:
            for renewal in renewals:
                renewal.stop()
        for name, outcome in outcomes.items():
            self._conclude(step, name, outcome, jax.process_index())

    def _conclude(self, step: int, name: str, outcome: Any, process: int) -> None:
        """Records one suite's outcome of a step (process 0), or says it in this process's log."""
        where = f"step {step}" + (f" suite {name!r}" if name else "")
        if isinstance(outcome, Exception):
            if self.primary:
                with self._claim_kept(step):
                    self._record_failure(name, step, outcome)
            else:  # process 0 records it; this process says why its part failed, for the job's logs
                LOG.warning("tracker-eval: process %d: %s failed: %s: %s", process, where,
                            type(outcome).__name__, one_line(outcome, limit=400))
            return
        if not self.primary:
            # Every process finalizes the same reduced metrics; saying so lets an operator check.
            LOG.info("tracker-eval: process %d: %s reduced metrics %s", process, where,
                     json.dumps(outcome.to_json()["metrics"], sort_keys=True))
            return
        LOG.info("tracker-eval: %s evaluated in %.1f s: %s", where, outcome.provenance.get("eval_wall_s", 0.0),
                 _headline(outcome.metrics))
        with self._claim_kept(step):
            self.stream.record(outcome)

    @contextlib.contextmanager
    def _claim_kept(self, step: int) -> Iterator[None]:
        """Drops, with one warning, what this watcher does under a claim another process took over.

        That happens only when this process could not renew for `lease_ttl_s` (suspended, or its
        disk stalled): the step belongs to its new holder, whose result counts; the watch goes on.
        """
        from tracker_eval.ledger.steps import IllegalTransitionError, LeaseLostError  # noqa: PLC0415

        try:
            yield
        except (LeaseLostError, IllegalTransitionError) as error:
            LOG.warning("tracker-eval: step %d: this watcher's claim was taken over (it could not renew it for "
                        "watch.lease_ttl_s=%g s), so its outcome is dropped: %s", step, self.watch.lease_ttl_s,
                        one_line(error, limit=300))

    def _record_failure(self, name: str, step: int, error: Exception) -> None:
        from tracker_eval.ledger.steps import StepState  # noqa: PLC0415

        reason = f"{type(error).__name__}: {one_line(error, limit=400)}"
        state = self.ledgers[name].mark_failed(step, reason, owner=self.owner)
        self.schedule.retry_after[(name, step)] = time.monotonic() + self.watch.poll_interval_s
        where = f"step {step}" + (f" suite {name!r}" if name else "")
        if state == StepState.GIVEN_UP:
            LOG.warning("tracker-eval: %s given up after %d attempts: %s", where, self.watch.max_attempts, reason)
        else:
            LOG.warning("tracker-eval: %s failed (will retry): %s", where, reason)

    def _shutdown(self) -> None:
        signalled = self.stop_reason.startswith("signal")
        if signalled:
            drain_s = _STOP_DRAIN_S
        else:
            # One wait in all: what until_step's settling already waited counts against it.
            seen = self.schedule.evaluated_seen
            waited = time.monotonic() - min(seen.values()) if seen else 0.0
            drain_s = max(0.0, self.watch.outbox_wait_s - waited)
        drained = self.stream.close(drain_s=drain_s, close_timeout_s=3.0 if signalled else 30.0)
        self.events.close()
        self.poller.close()
        waiting = {k: v for k, v in self.delivery.pending().items() if v}
        LOG.info("tracker-eval: stopped (%s)%s", self.stop_reason or "done",
                 "" if drained else f"; undelivered results wait in the outbox: {waiting}")
        self.stream.close_ledgers()


def _suites_text(names: Sequence[str]) -> str:
    return f" (suite{'s' if len(names) > 1 else ''} {', '.join(names)})" if any(names) else ""


def _headline(metrics: Any) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in list(sorted(metrics.items()))[:4])

