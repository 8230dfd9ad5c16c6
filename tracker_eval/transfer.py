"""Moving evaluation outputs to the host: once per evaluation, never per batch.

    reduced = fetch_accumulator(accumulator)              # per-shard partials, one transfer
    rows = collect_rows(pending, tag="eval-3")            # per-example rows, dataset order
    for batch in log_every(batches, every=100, mode="test"): ...

With several processes, the few per-shard partials are all-gathered (every process finalizes the
same reduced metrics) while per-example rows go to process 0 only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from tracker_eval import distributed

LOG = logging.getLogger(__name__)


def collect_rows(pending: list[tuple[dict[str, jax.Array], np.ndarray]], *, tag: str) -> dict[str, np.ndarray]:
    """Real per-example rows of every batch, concatenated once in dataset order.

    Args:
      pending: (rows by metric name, this process's host mask) per batch, rows still on device.
      tag: unique name of this gather across processes.

    Returns:
      The rows on process 0; an empty dict on other processes of a multi-process job.
    """
    if not pending or not pending[0][0]:
        return {}
    names = list(pending[0][0])
    if jax.process_count() == 1:
        fetched = jax.device_get([rows for rows, _ in pending])  # one call, transfers in parallel
    else:
        fetched = [{name: local_rows(rows[name]) for name in names} for rows, _ in pending]
    rows = {
        name: np.concatenate([batch[name][host_mask] for batch, (_, host_mask) in zip(fetched, pending, strict=True)])
        for name in names
    }
    if jax.process_count() == 1:
        return rows
    counts = np.asarray([int(host_mask.sum()) for _, host_mask in pending])
    gathered = distributed.gather_to_primary(rows, counts=counts, tag=tag)
    return gathered if gathered is not None else {}


def log_every(batches: Iterable[Any], *, every: int, mode: str) -> Iterable[Any]:
    """Plain progress lines for logs (no terminal): one per `every` batches, none for short runs."""
    for count, item in enumerate(batches, start=1):
        if count % every == 0 and jax.process_index() == 0:
            LOG.info("tracker-eval: %s: %d batches evaluated", mode, count)
        yield item


def fetch_accumulator(tree: Any) -> Any:
    """Host copy of the accumulator; with several processes the per-shard partials are gathered
    (a few numbers per metric) so every process finalizes the same reduced metrics."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global row order.

    Shards replicated over other mesh axes are taken once. In a single process these are all rows.
    """
    seen: dict[int, np.ndarray] = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        if start not in seen:
            seen[start] = np.asarray(shard.data)
    return np.concatenate([seen[k] for k in sorted(seen)])

