"""Delivers stored results from the ledger's outbox to each logger, in step order, through outages.

    delivery = Delivery(ledger, session, owner=owner, best_metric="loss")
    delivery.start()              # one thread per logger
    delivery.notify()             # a new result (or a new best) was recorded
    delivery.drain(timeout=60)
    delivery.stop()               # the threads; the leases stay held
    delivery.release(keep=busy)   # once the loggers' own calls are over

Metrics are recorded in the ledger before any logger sees them. Each attempt is marked begun in
the ledger; a delivery counts only after the logger's flush returned, and only then is it
acknowledged. A process that takes a logger over (from a dead, closed or stalled holder) first has
the logger learn again what its tracker holds, naming the steps that were in flight, so a step
sent but not acknowledged is not sent twice.

A failure is classified once (`tracker_eval.loggers.failures`): an outage is retried with backoff
for as long as it lasts and never counted; a refusal makes the delivery undeliverable at once;
anything else after ``max_delivery_attempts``. An undeliverable result no longer holds later steps
back. The best-checkpoint summary travels the same way, under the same lease: the holder sends the
ledger's current best whenever it differs from what the tracker was last given, so a tracker never
ends on an older best. One thread per logger keeps a hanging tracker from delaying the others.

A run with several suites has one ledger stream per suite; one `Delivery` serves them all, so each
logger gets every (step, suite) result from one thread, in step order (suites of one step in config
order), under one delivery lease that the suites' streams share.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from tracker_eval.errors import one_line
from tracker_eval.identity import best_key, suite_label
from tracker_eval.ledger.lease import LeaseClaim
from tracker_eval.ledger.steps import Ledger, LedgerError
from tracker_eval.loggers.failures import FailureKind
from tracker_eval.loggers.session import LoggerSession
from tracker_eval.loggers.worker import LoggerError

LOG = logging.getLogger("tracker_eval")
_SUMMARY_BACKOFF_CAP_S = 60.0


class Delivery:
    """Per-logger outbox workers over one ledger stream.

    Args:
      ledger: the stream's ledger, or each suite's ledger by suite name (config order).
      session: the stream's loggers.
      owner: this process's owner id for delivery leases.
      idle_wait_s: how often an idle worker looks at the outbox again.
      lease_ttl_s: delivery lease length (must outlive one delivery).
      best_metric: the tracked metric (``watch.best.metric``), whose best step each tracker's
        summary gets; None for no summary.
      best_suite: the suite whose ledger tracks `best_metric` (``watch.best.suite``).
    """

    def __init__(
        self,
        ledger: Ledger | Mapping[str, Ledger],
        session: LoggerSession,
        *,
        owner: str,
        idle_wait_s: float = 1.0,
        lease_ttl_s: float = 30.0,
        best_metric: str | None = None,
        best_suite: str | None = None,
    ) -> None:
        self.lease_ttl_s = lease_ttl_s
        self.ledgers: dict[str, Ledger] = dict(ledger) if isinstance(ledger, Mapping) else {ledger.suite: ledger}
        # Leases, summary marks and run state are the run's: any suite's ledger reaches them.
        self.ledger = next(iter(self.ledgers.values()))
        self.best_suite = best_suite if best_suite in self.ledgers else self.ledger.suite
        self.session = session
        self.owner = owner
        self.idle_wait_s = idle_wait_s
        self.best_metric = best_metric
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failing: dict[str, str] = {}
        self._synced: set[str] = set()  # loggers that learned what their tracker holds since taken over
        self._summary_retry: dict[str, tuple[float, float]] = {}  # name -> (next try, monotonic; delay)

    @property
    def logger_names(self) -> list[str]:
        return list(self.ledger.loggers)

    def start(self) -> None:
        """Starts one delivery thread per configured logger."""
        for name in self.logger_names:
            thread = threading.Thread(target=self._run, args=(name,), name=f"deliver-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        """Wakes the workers (a result or a new best was just recorded)."""
        with self._wake:
            self._wake.notify_all()

    def pending(self) -> dict[str, int]:
        """Undelivered results per logger (undeliverable ones are not waited for)."""
        return {name: sum(len(ledger.pending_deliveries(name)) for ledger in self.ledgers.values())
                for name in self.logger_names}

    def summaries_pending(self) -> list[str]:
        """Loggers whose tracker has not been given the ledger's current best yet."""
        values = self._summary()
        if values is None:
            return []
        text = _encode(values)
        return [n for n in self.logger_names if self.session.summarizes(n) and self.ledger.summary_sent(n) != text]

    def drain(self, timeout: float) -> bool:
        """Waits until every logger has every result and the current best, or `timeout` passes;
        True when drained."""
        deadline = time.monotonic() + timeout
        while True:
            drained = not any(self.pending().values()) and not self.summaries_pending()
            if drained or time.monotonic() >= deadline:
                return drained
            self.notify()
            time.sleep(0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the workers (a delivery in progress finishes or times out on its own deadline).

        The delivery leases stay held: a logger call may still be running on its own thread, and
        another process must not take the logger over before it ended (`release`).
        """
        self._stopping.set()
        self.notify()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def release(self, *, keep: Iterable[str] = ()) -> None:
        """Gives up the delivery leases, except those of `keep` (loggers whose calls still run:
        their leases end by expiry or with this process)."""
        kept = set(keep)
        for name in self.logger_names:
            if name in kept:
                LOG.warning("tracker-eval: logger %r was still busy at close; its delivery lease ends "
                            "with this process or after %.0f s", name, self.lease_ttl_s)
                continue
            try:
                self.ledger.release_logger(name, owner=self.owner)
            except LedgerError:
                pass

    def _sleep(self, seconds: float) -> None:
        with self._wake:
            if not self._stopping.is_set():
                self._wake.wait(max(0.0, min(seconds, self.idle_wait_s * 5)))

    def _run(self, name: str) -> None:
        while not self._stopping.is_set():
            try:
                waited = self._deliver_next(name)
            except Exception as error:  # noqa: BLE001 - a broken ledger read must not kill the thread
                if self._stopping.is_set():  # e.g. the loggers closed under a delivery that was starting
                    return
                LOG.warning("tracker-eval: delivery to %r hit an error: %s", name, error)
                waited = False
            if not waited:
                self._sleep(self.idle_wait_s)

    def _deliver_next(self, name: str) -> bool:
        """Delivers the lowest pending step of `name` if due (else the summary, if it changed).
        Returns True when work was done or waited for."""
        claim = self.ledger.claim_logger(name, owner=self.owner, ttl_s=self.lease_ttl_s)
        if claim is not LeaseClaim.RENEWED:
            self._synced.discard(name)  # refused, or taken over: what the tracker holds may have changed
        if not claim:
            return False  # another process delivers to this logger
        pending = self._pending_in_order(name)
        now = time.time()
        if not pending or pending[0][2] > now:
            if self._send_summary(name):
                return True
            if pending:
                self._sleep(pending[0][2] - now)
                return True
            return False
        step, suite, _ = pending[0]
        ledger = self.ledgers[suite]
        result = ledger.result(step)
        if result is None:
            return False
        error = self._prepare(name)
        if error is None:
            ledger.begin_delivery(step, name, owner=self.owner)
            error = self.session.deliver(result, [name]).get(name)
        if error is None:
            ledger.mark_delivered(step, name, owner=self.owner)
            if name in self._failing:
                LOG.warning("tracker-eval: logger %r is back; delivering its backlog in step order", name)
                del self._failing[name]
            return True
        self._record_failure(ledger, step, name, error)
        return False

    def _pending_in_order(self, name: str) -> list[tuple[int, str, float]]:
        """(step, suite, next attempt) of every result `name` lacks: by step, then suite order."""
        order = {suite: i for i, suite in enumerate(self.ledgers)}
        pending = [(step, suite, due) for suite, ledger in self.ledgers.items()
                   for step, due in ledger.pending_deliveries(name)]
        return sorted(pending, key=lambda item: (item[0], order[item[1]]))

    def _prepare(self, name: str) -> Exception | None:
        """Starts a logger that could not start, and has it learn what its tracker holds if this
        process has not asked since it took the logger over."""
        starting = name in self.session.construction_failures
        error = self.session.start_failed(name)  # None when it runs (or always did)
        if error is not None:
            return error
        if starting:
            self._synced.discard(name)
        if name not in self._synced:
            for suite, ledger in self.ledgers.items():
                error = self.session.reconcile(name, ledger.in_flight_deliveries(name),
                                               suite=suite_label(suite, ledger.suite_version))
                if error is not None:  # the tracker cannot be read: not the result's fault
                    return LoggerError(name, "reconcile", one_line(error, limit=300), kind=FailureKind.UNAVAILABLE)
            self._synced.add(name)
        return None

    def _record_failure(self, ledger: Ledger, step: int, name: str, error: Exception) -> None:
        kind = getattr(error, "kind", FailureKind.TRANSIENT)
        # The logger and step are in the row already; keep what the tracker said.
        text = error.reason if isinstance(error, LoggerError) else one_line(error)
        reason = " ".join(text.split())[:300]
        delay = ledger.mark_delivery_failed(step, name, reason, owner=self.owner,
                                                 counted=kind is FailureKind.TRANSIENT,
                                                 permanent=kind is FailureKind.PERMANENT)
        if math.isinf(delay):
            LOG.warning("tracker-eval: step %d is undeliverable to logger %r (%s); later steps go on. Once the "
                        "cause is fixed, `tracker-eval retry --config FILE --step %d --logger %s` sends it again",
                        step, name, reason, step, name)
            return
        if name not in self._failing:
            LOG.warning("tracker-eval: logger %r failed for step %d (%s); retrying in %.0f s, results wait "
                        "in the outbox", name, step, reason, delay)
        self._failing[name] = reason

    def _summary(self) -> dict[str, Any] | None:
        if self.best_metric is None:
            return None
        ledger = self.ledgers[self.best_suite]
        best = ledger.best()
        key = best_key(suite_label(self.best_suite, ledger.suite_version), self.best_metric)
        return None if best is None else {"best_step": best[0], key: best[1]}

    def _send_summary(self, name: str) -> bool:
        """Gives the tracker the ledger's current best if it has not got it; True when sent."""
        values = self._summary()
        if values is None or not self.session.summarizes(name):
            return False
        text = _encode(values)
        if self.ledger.summary_sent(name) == text:
            return False
        retry_at, delay = self._summary_retry.get(name, (0.0, 0.0))
        if time.monotonic() < retry_at:
            return False
        error = self.session.set_summary(name, values)
        if error is not None:
            delay = min(_SUMMARY_BACKOFF_CAP_S, max(1.0, 2 * delay))
            self._summary_retry[name] = (time.monotonic() + delay, delay)
            LOG.warning("tracker-eval: logger %r: best-checkpoint summary not set (%s); retrying in %.0f s",
                        name, one_line(error, limit=300), delay)
            return False
        self._summary_retry.pop(name, None)
        self.ledger.mark_summary_sent(name, text, owner=self.owner)
        return True


def _encode(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)
