"""The watcher's view of the checkpoint storage: one lister kept across polls, backing off while it fails.

    poller = StepPoller(config.checkpoint_dir, poll_interval_s=5.0)
    steps = poller.poll()     # finalized steps, or None while the storage does not answer
    poller.close()

Folders that look like checkpoints but match no step name read (`checkpoint.step_prefix`) are
said in one warning at the poll that first sees them, naming the setting that would read them.

A poll that fails (a bucket's server down, a network error, an I/O error on a mounted disk) is
logged once, and the storage is asked again after a backoff that doubles from the poll interval
up to a minute; the first poll that works again says so once. While the storage does not answer,
the watcher claims nothing, so an outage does not use up checkpoints' evaluation attempts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from tracker_eval.checkpoints.listing import StepLister, open_lister
from tracker_eval.checkpoints.roots import StepNames
from tracker_eval.checkpoints.tree import StorageUnavailableError
from tracker_eval.errors import one_line

LOG = logging.getLogger("tracker_eval")

MAX_BACKOFF_S = 60.0


class StepPoller:
    """Polls one checkpoint root through its `StepLister`, with error backoff.

    Args:
        checkpoint_dir: The CheckpointManager root (local path or URL).
        poll_interval_s: The first backoff after a failure (doubling up to `MAX_BACKOFF_S`).
        step_names: How step folders are named (`checkpoint.step_prefix`); None detects it.
        clock: Monotonic time source (tests).

    Raises:
        ConfigError: From the lister: a malformed location or missing credentials.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike[str], *, poll_interval_s: float,
                 step_names: StepNames | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.lister: StepLister = open_lister(checkpoint_dir, step_names=step_names)
        self.notice: str | None = None
        self._base_s = max(poll_interval_s, 0.1)
        self._clock = clock
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._failing_since: float | None = None

    @property
    def failing(self) -> bool:
        """True from a failed poll until the next one that works."""
        return self._failing_since is not None

    def poll(self) -> list[int] | None:
        """The finalized steps; None while the storage fails (or its backoff has not passed)."""
        now = self._clock()
        if self.failing and now < self._retry_at:
            return None
        try:
            steps = self.lister.finalized_steps()
        except StorageUnavailableError as error:
            self._failed(error, now)
            return None
        if self._failing_since is not None:
            LOG.warning("tracker-eval: checkpoint storage answers again after %.0f s: %s",
                        now - self._failing_since, self.lister.location)
            self._failing_since = None
            self._backoff_s = 0.0
        if self.lister.notice != self.notice:
            self.notice = self.lister.notice
            if self.notice:
                LOG.warning("tracker-eval: %s", self.notice)
        return steps

    def failed_elsewhere(self, error: Exception) -> None:
        """Records that a restore found the storage unreachable: back off as after a failed poll."""
        self._failed(error, self._clock())

    def close(self) -> None:
        self.lister.close()

    def _failed(self, error: Exception, now: float) -> None:
        if self._failing_since is None:
            self._failing_since = now
            LOG.warning("tracker-eval: checkpoint storage not answering (%s); retrying with backoff",
                        one_line(error, limit=300))
        self._backoff_s = min(MAX_BACKOFF_S, max(self._base_s, self._backoff_s * 2))
        self._retry_at = now + self._backoff_s
