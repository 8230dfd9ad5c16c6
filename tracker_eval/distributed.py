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

from tracker_eval.config import DistributedConfig
from tracker_eval.errors import ConfigError

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


def is_primary() -> bool:
    """True on process 0, the one that decides, records and reports."""
    return jax.process_index() == 0


def broadcast_from_primary(value: int) -> int:
    """Process 0's integer, on every process (no-op in a single process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))
