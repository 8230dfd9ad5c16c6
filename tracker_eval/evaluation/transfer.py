"""Moving evaluation outputs to the host without a per-batch wait.

    reduced = fetch_accumulator(accumulator)              # per-shard partials, one transfer
    rows = RowStream(lag=4)
    rows.add(batch_rows, host_mask)                       # per batch: starts an async copy
    per_example = rows.collect(tag="eval-3")              # dataset order, concatenated once

With several processes, the few per-shard partials are all-gathered (every process finalizes the
same reduced metrics) while per-example rows go to process 0 only.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import jax
import numpy as np

from tracker_eval import kvstore

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

    def collect(self, *, tag: str) -> dict[str, np.ndarray]:
        """Real rows of every batch, in dataset order.

        Args:
          tag: unique name of this gather across processes.

        Returns:
          The rows on process 0; an empty dict on other processes of a multi-process job.
        """
        while self._on_device:
            self._take_oldest()
        batches, self._on_host = self._on_host, []
        if not batches or not batches[0][0]:
            return {}
        rows = {name: np.concatenate([batch[name] for batch, _ in batches]) for name in batches[0][0]}
        if jax.process_count() == 1:
            return rows
        counts = np.asarray([int(host_mask.sum()) for _, host_mask in batches])
        gathered = gather_to_primary(rows, counts=counts, tag=tag)
        return gathered if gathered is not None else {}


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


def gather_to_primary(
    arrays: dict[str, np.ndarray], *, counts: np.ndarray, tag: str
) -> dict[str, np.ndarray] | None:
    """Every process's per-example rows on process 0 only, in dataset order; None elsewhere.

    Args:
      arrays: this process's real rows, batch after batch.
      counts: this process's number of real rows in each batch.
      tag: unique name of this gather (e.g. the step), so consecutive gathers never mix.

    Rows travel through the runtime's key-value store, so only process 0 ever holds them all; the
    global batch order (process 0's slice, then process 1's, ...) is restored batch by batch.
    """
    if jax.process_count() == 1:
        return arrays
    import io  # noqa: PLC0415

    client = kvstore.client()
    buffer = io.BytesIO()
    np.savez(buffer, __counts__=np.asarray(counts, np.int64), **arrays)
    client.key_value_set_bytes(f"tracker_eval/rows/{tag}/{jax.process_index()}", buffer.getvalue())
    if jax.process_index() != 0:
        return None
    per_process = []
    for index in range(jax.process_count()):
        key = f"tracker_eval/rows/{tag}/{index}"
        data = client.blocking_key_value_get_bytes(key, 600_000)
        with np.load(io.BytesIO(data)) as loaded:
            bounds = np.cumsum(loaded["__counts__"])[:-1]
            per_process.append({name: np.split(loaded[name], bounds) for name in arrays})
        client.key_value_delete(key)
    batches = len(per_process[0][next(iter(arrays))]) if arrays else 0
    return {
        name: np.concatenate([part[name][b] for b in range(batches) for part in per_process])
        for name in arrays
    }
