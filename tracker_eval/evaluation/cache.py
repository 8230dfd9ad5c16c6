"""The eval set kept across evaluations: read and prepared once per process, replayed per checkpoint.

    cache = BatchCache(mode="host", max_mb=1024)
    data = CachedData(lambda: make_eval_data(split=..., batch_size=...), cache=cache)
    evaluation.evaluate(state_100, data)   # the data factory runs; its prepared batches are recorded
    evaluation.evaluate(state_200, data)   # replayed: the factory is not called again

Modes: `host` keeps each batch as this process's padded host arrays (the work of the data factory
and the padding is saved; the copy to the devices is redone, ahead of the step as usual); `device`
keeps the placed global arrays and masks on the devices, already sharded (nothing is redone);
`none` streams from the factory every time. A recording that passes `max_bytes` (this process's
bytes: host arrays, or the device shards this process holds; MB = 2**20 bytes) is dropped at once, and the cache
stays off for the life of the process, since the same data would not fit next time either.

A cache holds one data spec for one process's lifetime: it is never written to disk, and each
process of a multi-process job caches its own slice. It assumes the factory yields the same
batches on every call; a factory that reshuffles or samples anew needs `cache: none`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from tracker_eval.config.schema import CACHE_MODES
from tracker_eval.evaluation import batches as batches_lib
from tracker_eval.evaluation.sharding import BatchPlacer

LOG = logging.getLogger(__name__)

Placed = tuple[Any, jax.Array, np.ndarray]  # (global batch, device mask, this process's host mask)


class BatchCache:
    """Prepared batches of one eval set, recorded on the first complete evaluation.

    Args:
      mode: host, device or none (see the module docstring).
      max_mb: the largest recording kept, in MB (2**20 bytes); past it the cache turns itself off.
    """

    def __init__(self, *, mode: str, max_mb: float) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
        self.mode = mode
        self.max_mb = max_mb
        self.max_bytes = int(max_mb * 2**20)
        self.off = mode == "none"
        self.nbytes = 0
        self._batches: list[tuple[str, Any]] | None = None  # ("host", (padded, mask)) or ("device", placed)
        self._placer: BatchPlacer | None = None

    def holds(self, placer: BatchPlacer) -> bool:
        """Whether a complete recording for `placer` is there to replay."""
        return self._batches is not None and self._placer is placer

    def placed(self, source: Callable[[], Iterable[Any]], placer: BatchPlacer, *, depth: int) -> Iterable[Placed]:
        """Placed batches: replayed when recorded for this placer, else from `source()`, recording.

        Args:
          source: calls the data factory (called only when nothing can be replayed).
          placer: the evaluation's batch placer (a recording belongs to one placer).
          depth: host batches placed ahead of the step.
        """
        if self.holds(placer):
            return self._replay(placer, depth=depth)
        self._batches, self._placer = None, None
        if self.off:
            return batches_lib.placed_batches(source(), placer.place, depth=depth)
        return self._record(source(), placer, depth=depth)

    def _record(self, data: Iterable[Any], placer: BatchPlacer, *, depth: int) -> Iterator[Placed]:
        recorded: list[tuple[str, Any]] | None = []
        total = 0

        def place(batch: Any) -> Placed:
            nonlocal recorded, total
            if self.mode == "device" or placer.is_placed(batch):
                placed = placer.place(batch)
                item, size = ("device", placed), _device_bytes(placed)
            else:
                padded, host_mask = placer.pad(batch)
                # A copy: a loader may refill the same buffers for its next batch.
                kept = (jax.tree.map(np.array, padded), host_mask)
                placed = placer.to_device(padded, host_mask)
                item, size = ("host", kept), sum(a.nbytes for a in jax.tree.leaves(kept))
            if recorded is not None:
                total += size
                if total > self.max_bytes:
                    recorded = None
                    self._turn_off(total)
                else:
                    recorded.append(item)
            return placed

        # Runs only when the evaluation took every batch: an aborted one records nothing.
        yield from batches_lib.placed_batches(data, place, depth=depth)
        if recorded:
            self._batches, self._placer, self.nbytes = recorded, placer, total

    def _replay(self, placer: BatchPlacer, *, depth: int) -> Iterable[Placed]:
        assert self._batches is not None
        if all(kind == "device" for kind, _ in self._batches):
            return (placed for _, placed in self._batches)

        def place(item: tuple[str, Any]) -> Placed:
            kind, held = item
            return held if kind == "device" else placer.to_device(*held)

        return batches_lib.prefetch(self._batches, place, depth=depth)

    def _turn_off(self, total: int) -> None:
        self.off = True
        LOG.info(
            "tracker-eval: the eval set passed cache_max_mb=%g (%.3g MB when it was dropped) and is not cached; "
            "every evaluation reads it again (raise cache_max_mb to keep it, or set cache: none)",
            self.max_mb, total / 2**20,
        )


class CachedData:
    """An eval set behind a `BatchCache`: what `Pipeline.data()` hands to the evaluation.

    Iterating it streams from the factory (uncached), so it can stand in for a plain loader; the
    evaluation asks `placed` instead, which replays when it can.

    Args:
      source: zero-argument call of the data factory.
      cache: the cache shared by every evaluation of this data.
    """

    def __init__(self, source: Callable[[], Iterable[Any]], *, cache: BatchCache) -> None:
        self.source = source
        self.cache = cache
        self.replayed = False

    def __iter__(self) -> Iterator[Any]:
        return iter(self.source())

    def placed(self, placer: BatchPlacer, *, depth: int) -> Iterable[Placed]:
        """Placed batches for `placer`, from the cache when it holds them (then `replayed` is set)."""
        self.replayed = self.cache.holds(placer)
        return self.cache.placed(self.source, placer, depth=depth)


def _device_bytes(placed: Placed) -> int:
    """Bytes of a placed batch and its mask on this process's devices (replicas counted)."""
    total = 0
    for leaf in jax.tree.leaves(placed[:2]):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize * len(leaf.sharding.addressable_devices)
    return total
