"""Keeping a step's evaluation claim alive while its holder is evaluating it.

A claim is a lease of `watch.lease_ttl_s`; a holder that stops renewing it is taken for dead and
the step is taken over (and evaluated again). The watcher and `InTrainingEvaluation` both hold
their claim through this, so an evaluation may take any time while its process lives.

    with ClaimRenewal(ledger, step, owner=owner, ttl_s=30.0) as claim:
        result = evaluate(step)
    if claim.lost:
        ...   # another process took the step over (this one was paused past the lease)
"""

from __future__ import annotations

import logging
import threading
from typing import Any

LOG = logging.getLogger("tracker_eval")


class ClaimRenewal:
    """Renews `owner`'s claim on `step` every third of `ttl_s` from a background thread until stopped.

    Args:
      ledger: the stream's `tracker_eval.ledger.steps.Ledger`.
      step: the claimed step.
      owner: the claim holder.
      ttl_s: the lease length each renewal grants.
      heartbeat: also record a watcher heartbeat at each renewal (the watcher's liveness for
        `status --health` during a long evaluation).
    """

    def __init__(self, ledger: Any, step: int, *, owner: str, ttl_s: float, heartbeat: bool = False) -> None:
        self.step = step
        self.lost = False
        self._ledger = ledger
        self._owner = owner
        self._ttl_s = ttl_s
        self._heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"claim-{step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_s / 3):
            try:
                if not self._ledger.renew(self.step, owner=self._owner, ttl_s=self._ttl_s):
                    self.lost = True  # taken over: renewing further could only fail
                    return
                if self._heartbeat:
                    self._ledger.touch_heartbeat(self._owner)
            except Exception as error:  # noqa: BLE001 - a busy or full disk: try again next period
                LOG.debug("tracker-eval: renewing the claim on step %d failed: %s", self.step, error)

    def stop(self) -> None:
        """Stops renewing; waits briefly for a renewal in flight so none lands after the result."""
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> ClaimRenewal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
