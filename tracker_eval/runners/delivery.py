"""Delivers stored results from the ledger's outbox to each logger, in step order, through outages.

    delivery = Delivery(ledger, session, owner=owner)
    delivery.start()          # one thread per logger
    delivery.notify()         # a new result was recorded
    delivery.drain(timeout=60)
    delivery.stop()

Metrics are recorded in the ledger before any logger sees them; a delivery counts only after the
logger's flush returned, and only then is it marked in the ledger. A crash between the two makes a
re-send possible, which the loggers absorb (they skip steps their tracker already holds).
One thread per logger keeps a hanging tracker from delaying the others.
"""

from __future__ import annotations

import logging
import threading
import time

from tracker_eval.errors import one_line
from tracker_eval.ledger.steps import Ledger, LedgerError
from tracker_eval.loggers.session import LoggerSession

LOG = logging.getLogger("tracker_eval")


class Delivery:
    """Per-logger outbox workers over one ledger stream."""

    def __init__(
        self, ledger: Ledger, session: LoggerSession, *, owner: str, idle_wait_s: float = 1.0, lease_ttl_s: float = 30.0
    ) -> None:
        self.lease_ttl_s = lease_ttl_s
        self.ledger = ledger
        self.session = session
        self.owner = owner
        self.idle_wait_s = idle_wait_s
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failing: dict[str, str] = {}

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
        """Wakes the workers (a result was just recorded)."""
        with self._wake:
            self._wake.notify_all()

    def pending(self) -> dict[str, int]:
        """Undelivered results per logger."""
        return {name: len(self.ledger.pending_deliveries(name)) for name in self.logger_names}

    def drain(self, timeout: float) -> bool:
        """Waits until every logger has every result, or `timeout` passes; True when drained."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.pending().values()):
                return True
            self.notify()
            time.sleep(0.1)
        return not any(self.pending().values())

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the workers (a delivery in progress finishes or times out on its own deadline)."""
        self._stopping.set()
        self.notify()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for name in self.logger_names:
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
                LOG.warning("tracker-eval: delivery to %r hit an error: %s", name, error)
                waited = False
            if not waited:
                self._sleep(self.idle_wait_s)

    def _deliver_next(self, name: str) -> bool:
        """Delivers the lowest pending step of `name` if due. Returns True when work was done."""
        if not self.ledger.claim_logger(name, owner=self.owner, ttl_s=self.lease_ttl_s):
            return False  # another process delivers to this logger
        pending = self.ledger.pending_deliveries(name)
        if not pending:
            return False
        step, due_at = pending[0]
        now = time.time()
        if due_at > now:
            self._sleep(due_at - now)
            return True
        result = self.ledger.result(step)
        if result is None:
            return False
        error: Exception | None = self.session.start_failed(name)  # None when it runs (or always did)
        if error is None:
            error = self.session.deliver(result, [name]).get(name)
        if error is None:
            self.ledger.mark_delivered(step, name, owner=self.owner)
            if name in self._failing:
                LOG.warning("tracker-eval: logger %r is back; delivering its backlog in step order", name)
                del self._failing[name]
            return True
        delay = self.ledger.mark_delivery_failed(step, name, one_line(error, limit=300), owner=self.owner)
        if name not in self._failing:
            LOG.warning("tracker-eval: logger %r failed for step %d (%s); retrying in %.0f s, results wait "
                        "in the outbox", name, step, one_line(error, limit=300), delay)
        self._failing[name] = str(error)
        return False

