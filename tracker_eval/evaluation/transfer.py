"""Moving evaluation outputs to the host without a per-batch wait.

    rows = RowStream(lag=4)
    rows.add(batch_rows, host_mask)                       # per batch: starts an async copy
    reduced, per_example = finish(accumulator, rows, exchange)   # one transfer; dataset order

With several processes, the few per-shard partials are all-gathered (every process finalizes the
same reduced metrics) while per-example rows go to process 0 only, through the evaluation's
exchange (keyed by stream, step and attempt), and only after every process has agreed that all
its steps finished: the all-gather is a collective that a failed peer would never join.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import jax
import numpy as np

LOG = logging.getLogger(__name__)


class RowStream:
    """Per-example rows of each batch leave the device while later batches run.

    `add` starts an asynchronous device-to-host copy of a batch's rows and returns at once; the
    rows are taken into host memory `lag` batches later, when that copy has long finished, and the
    device buffers are dropped. So device memory holds at most `lag` batches of rows however large
    the eval set, and no batch waits on a transfer. `collect` concatenates once, in dataset order.

    Args:
      lag: batches whose rows may still be on the device (>= 1).
    """

    def __init__(self, *, lag: int = 4) -> None:
        self.lag = max(1, lag)
        self._on_device: collections.deque[tuple[dict[str, jax.Array], np.ndarray]] = collections.deque()
        self._on_host: list[tuple[dict[str, np.ndarray], np.ndarray]] = []

    def add(self, rows: dict[str, jax.Array], host_mask: np.ndarray) -> None:
        """Queues one batch's rows (by metric name) with this process's mask of its real examples."""
        for array in rows.values():
            array.copy_to_host_async()
        self._on_device.append((rows, host_mask))
        while len(self._on_device) > self.lag:
            self._take_oldest()

    def _take_oldest(self) -> None:
        rows, host_mask = self._on_device.popleft()
        self._on_host.append(({name: local_rows(array)[host_mask] for name, array in rows.items()}, host_mask))

    def collect(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """This process's real rows of every batch in dataset order, and its real rows per batch."""
        while self._on_device:
            self._take_oldest()
        batches, self._on_host = self._on_host, []
        if not batches or not batches[0][0]:
            return {}, np.zeros(0, np.int64)
        rows = {name: np.concatenate([batch[name] for batch, _ in batches]) for name in batches[0][0]}
        return rows, np.asarray([int(host_mask.sum()) for _, host_mask in batches], np.int64)


def finish(accumulator: Any, rows: RowStream, exchange: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Reduced partials on every process and per-example rows on process 0, once all agree.

    Args:
      accumulator: the device accumulator after the last step.
      rows: the evaluation's row stream.
      exchange: the evaluation's `agreement` exchange (a pass-through in one process).

    Returns:
      (host partials, {metric: rows in dataset order}); the rows are empty on other processes.

    Raises:
      PeerFailedError: a peer failed, so nobody enters the all-gather.
    """
    local, counts = rows.collect()
    if exchange.solo:
        return jax.device_get(accumulator), local
    jax.block_until_ready(accumulator)  # a failed step shows here, before the peers hear all is well
    exchange.agree_done(rows=pack_rows(local, counts) if local else None)
    reduced = fetch_accumulator(accumulator)
    parts = exchange.gathered_rows()
    return reduced, merge_rows(parts) if parts else {}


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
    if array.is_fully_addressable:
        return np.asarray(array)
    seen: dict[int, np.ndarray] = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        if start not in seen:
            seen[start] = np.asarray(shard.data)
    return np.concatenate([seen[k] for k in sorted(seen)])


def pack_rows(arrays: dict[str, np.ndarray], counts: np.ndarray) -> bytes:
    """One process's rows (and its real rows per batch) as one `.npz` blob."""
    import io  # noqa: PLC0415

    buffer = io.BytesIO()
    # Positional names: a metric may be called anything, `file` included (np.savez's own keyword).
    names = sorted(arrays)
    np.savez(buffer, counts=np.asarray(counts, np.int64), names=np.asarray(names),
             **{f"m{i}": arrays[name] for i, name in enumerate(names)})
    return buffer.getvalue()


def merge_rows(parts: list[bytes]) -> dict[str, np.ndarray]:
    """Every process's rows in dataset order: batch by batch, process 0's slice, then process 1's.

    Args:
      parts: `pack_rows` blobs in process order.
    """
    import io  # noqa: PLC0415

    per_process = []
    for data in parts:
        with np.load(io.BytesIO(data)) as loaded:
            bounds = np.cumsum(loaded["counts"])[:-1]
            names = [str(name) for name in loaded["names"]]
            per_process.append({name: np.split(loaded[f"m{i}"], bounds) for i, name in enumerate(names)})
    names = list(per_process[0])
    batches = len(per_process[0][names[0]]) if names else 0
    return {
        name: np.concatenate([part[name][b] for b in range(batches) for part in per_process])
        for name in names
    }
