"""JAX distributed runtime start-up and process-0 decisions.

    initialize(config.distributed)          # no-op for a single-process run
    if is_primary(): talk_to_trackers()
    step = broadcast_from_primary(step)     # every process evaluates what process 0 decided

Only process 0 lists checkpoints, writes the ledger and talks to trackers; every process computes.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from tracker_eval import kvstore
from tracker_eval.config import DistributedConfig
from tracker_eval.errors import ConfigError, one_line

LOG = logging.getLogger(__name__)


def initialize(config: DistributedConfig | None) -> None:
    """Starts JAX's distributed runtime when the config asks for it (before any device use).

    Raises:
      ConfigError: an incomplete explicit block (names the missing keys).
    """
    if config is None:
        return
    kwargs: dict[str, Any] = {
        "heartbeat_timeout_seconds": int(config.heartbeat_timeout_s),
        "initialization_timeout": int(config.initialization_timeout_s),
    }
    if not config.auto:
        missing = [k for k in ("coordinator_address", "num_processes", "process_id") if getattr(config, k) is None]
        if missing:
            raise ConfigError(
                f"distributed block is missing {missing}; set them (e.g. distributed.process_id=1) or use "
                "distributed.auto=true under SLURM/Kubernetes/TPU"
            )
        if not 0 <= config.process_id < config.num_processes:  # type: ignore[operator]
            raise ConfigError(
                f"distributed.process_id={config.process_id} is outside 0..{config.num_processes - 1}"  # type: ignore[operator]
            )
        kwargs.update(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    jax.distributed.initialize(**kwargs)
    LOG.info("process %d of %d joined the JAX distributed runtime", jax.process_index(), jax.process_count())
    if jax.process_count() > 1:
        PeerMonitor(timeout_s=max(2.0, config.heartbeat_timeout_s / 2)).start()


class PeerMonitor:
    """Ends this process with one clear line when a peer process is lost.

    JAX notices a dead peer only after its heartbeat timeout and then aborts the survivors from
    C++ (SIGABRT and a stack dump, no Python exception). Each process here writes a heartbeat key
    every second and watches the others' keys; a peer silent for `timeout_s` (half of JAX's
    heartbeat timeout), or a coordinator that stops answering, ends the process first, with exit
    code 1 and a line saying which peer was lost. Unfinished ledger claims are taken over on the
    next start because their owner is then dead.
    """

    def __init__(self, *, timeout_s: float, interval_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.interval_s = interval_s

    def start(self) -> None:
        import threading  # noqa: PLC0415

        threading.Thread(target=self._run, name="tracker-eval-peers", daemon=True).start()

    def _run(self) -> None:
        import time  # noqa: PLC0415

        me, count = jax.process_index(), jax.process_count()
        last_seen = {p: (None, time.monotonic()) for p in range(count) if p != me}
        beat = 0
        coordinator_errors_since: float | None = None
        while True:
            now = time.monotonic()
            try:
                client = kvstore.client()
                beat += 1
                kvstore.put(client, f"tracker_eval/alive/{me}", str(beat), overwrite=True)
                for peer, (value, since) in list(last_seen.items()):
                    current = kvstore.try_get(client, f"tracker_eval/alive/{peer}")
                    if current != value:
                        last_seen[peer] = (current, now)
                    elif now - since > self.timeout_s:
                        self._die(f"lost contact with peer process {peer} (no heartbeat for {now - since:.0f} s)")
                coordinator_errors_since = None
            except Exception as error:  # noqa: BLE001 - a coordinator that is gone answers with errors
                coordinator_errors_since = coordinator_errors_since or now
                if now - coordinator_errors_since > self.timeout_s / 2:
                    self._die(f"lost contact with the coordinator (process 0): {one_line(error, limit=200)}")
            time.sleep(self.interval_s)

    @staticmethod
    def _die(message: str) -> None:
        import os  # noqa: PLC0415
        import sys  # noqa: PLC0415

        sys.stdout.flush()
        print(f"tracker-eval: error: {message}; stopping this process (restart the job to resume: "
              "finished checkpoints are kept in the ledger)", file=sys.stderr, flush=True)
        os._exit(1)


def leave() -> None:
    """Leaves JAX's distributed runtime at the end of a run, while the interpreter is still whole.

    Left to JAX's exit hook, the leaving happens during interpreter shutdown: on a busy machine,
    process 0 (the coordination service) could be gone before a peer's client disconnected, and
    that peer aborted from C++ ("exception not rethrown", exit -6) after finishing its work. Here
    every process meets at the runtime's shutdown barrier first. A no-op without the runtime.
    """
    from jax._src import distributed as jax_distributed  # noqa: PLC0415 - whether initialize() ran

    if jax_distributed.global_state.client is None:
        return
    try:
        jax.distributed.shutdown()
    except Exception as error:  # noqa: BLE001 - the run's work is done; say so and exit as planned
        LOG.warning("tracker-eval: leaving the distributed runtime failed: %s", one_line(error, limit=200))


def is_primary() -> bool:
    """True on process 0, the one that decides, records and reports."""
    return jax.process_index() == 0


def broadcast_from_primary(value: int) -> int:
    """Process 0's integer, on every process (no-op in a single process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


class DecisionChannel:
    """Process 0's decisions (which step to evaluate, or stop) reaching every process, in order.

    Uses the distributed runtime's key-value store rather than a device collective: followers may
    wait for minutes between checkpoints, and a blocking key lookup has no collective timeout.
    Decision `seq` lives at `<namespace>/<seq>`; each follower records the last one it read at
    `<namespace>-read/<process>`, and process 0 deletes every decision all followers have read, so
    a watcher polling an idle directory for days keeps a handful of keys. `seq` is the same on
    every process after each exchange: it names the evaluation attempt that a decision starts.
    In a single process it only passes values through.
    """

    def __init__(self, *, namespace: str) -> None:
        self.namespace = namespace
        self.seq = 0
        self._deleted = 0  # process 0: decisions up to this one are gone from the store

    def exchange(self, value: int | None = None, *, poll_s: float = 1.0, alive: Any = None) -> int:
        """Process 0 passes its `value`; every process returns process 0's value.

        Args:
          value: the decision on process 0 (ignored elsewhere).
          poll_s: how often a follower re-checks `alive` while waiting.
          alive: optional callable; a follower stops waiting and raises when it returns False.

        Raises:
          RuntimeError: `alive` returned False while this follower waited.
        """
        self.seq += 1
        decided = int(value if value is not None else 0)
        if jax.process_count() == 1:
            return decided
        client = kvstore.client()
        key = f"{self.namespace}/{self.seq}"
        if is_primary():
            kvstore.put(client, key, str(decided))
            self._delete_read(client)
            return decided
        while True:
            got = kvstore.wait_get(client, key, timeout_s=poll_s)
            if got is not None:
                kvstore.put(client, f"{self.namespace}-read/{jax.process_index()}", str(self.seq), overwrite=True)
                return int(got)
            if alive is not None and not alive():
                raise RuntimeError("stopped while waiting for process 0")

    def _delete_read(self, client: Any) -> None:
        read = kvstore.keys_under(client, f"{self.namespace}-read")
        if len(read) < jax.process_count() - 1:
            return
        everyone = min(int(seq) for seq in read.values())
        for seq in range(self._deleted + 1, everyone + 1):
            kvstore.delete(client, f"{self.namespace}/{seq}")
        self._deleted = max(self._deleted, everyone)
