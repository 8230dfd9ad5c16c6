"""Slices a dataset into global batches and each process's share of them.

    for batch in process_batches({"x": x, "y": y}, batch_size=64, process_index=0, process_count=2):
        ...  # rows [0, 32) of each global batch of 64 (the last may be short or empty)

Process p takes the p-th contiguous block of every global batch, so concatenating the processes'
rows in process order gives the dataset order back (the order per-example metrics come in).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


def process_batches(
    arrays: Mapping[str, np.ndarray], *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's slice of every global batch; every process yields the same count."""
    n = len(next(iter(arrays.values())))
    local = -(-batch_size // process_count)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        lo = min(start + process_index * local, stop)
        hi = min(lo + local, stop)
        yield {k: v[lo:hi] for k, v in arrays.items()}
