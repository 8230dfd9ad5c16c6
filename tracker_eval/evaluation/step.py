"""The eval step: one batch's metrics folded into per-shard device accumulators, and their zeros.

    step = jax.jit(build_eval_step(batch_metrics, mesh=mesh, shards=8, on_trace=count),
                   donate_argnames=("metrics",))
    accumulator = zero_accumulator(metric_shapes, mesh=mesh, shards=8)
    accumulator, rows, done = step(params, mutable, accumulator, batch, mask, rng)
    accumulator, rows, batches = run_steps(step, state, placed, init=..., max_in_flight=2)

Each device accumulates its own rows (one partial per batch shard), so the step needs no
cross-device collective; the host adds the partials once at the end.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracker_eval.evaluation import metrics as metric_lib
from tracker_eval.evaluation import transfer
from tracker_eval.evaluation.sharding import batch_sharding, put, put_replicated

BATCH_INDEX = "__batch_index__"  # accumulator entry holding the device-side batch counter

BatchMetrics = Callable[[Any, Any, Any, jax.Array], Mapping[str, metric_lib.Metric]]


def build_eval_step(
    batch_metrics: BatchMetrics, *, mesh: jax.sharding.Mesh, shards: int, on_trace: Callable[[], None]
) -> Callable[..., Any]:
    """The un-jitted step `(params, mutable, metrics, batch, mask, rng) -> (metrics, rows, done)`.

    Args:
      batch_metrics: (params, mutable, batch, rng) -> dict of metric kinds for one batch (any
        pytree batch).
      mesh: the eval mesh.
      shards: batch shards of the mesh (data x fsdp).
      on_trace: called each time the step is traced (counts compilations).
    """
    shard_partials = batch_sharding(mesh)

    def eval_step(
        params: Any,
        mutable: Any,
        metrics: dict[str, dict[str, jax.Array]],
        batch: Any,
        mask: jax.Array,
        rng: jax.Array,
    ) -> tuple[dict[str, dict[str, jax.Array]], dict[str, jax.Array], jax.Array]:
        on_trace()
        # The batch index lives on device with the accumulator: no host transfer per step.
        index = metrics[BATCH_INDEX]["index"]
        per_batch = batch_metrics(params, mutable, batch, jax.random.fold_in(rng, index))
        new = {name: metric_lib.update_state(metrics[name], m, mask) for name, m in per_batch.items()}
        # Pin the layout: per-shard partials stay on their devices, so the next call sees
        # exactly the input shardings of this one (no second compile, no collective).
        new = jax.lax.with_sharding_constraint(new, shard_partials)
        new[BATCH_INDEX] = {"index": index + 1}
        rows = {name: m.values for name, m in per_batch.items() if isinstance(m, metric_lib.PerExample)}
        # A small output that is ready when this step is: the loop waits on it to bound the
        # dispatch queue (the accumulator itself is donated to the next step).
        done = mask.astype(jnp.int32).reshape(shards, -1).sum(axis=1)
        return new, rows, done

    return eval_step


def zero_accumulator(
    metric_shapes: Mapping[str, metric_lib.Metric], *, mesh: jax.sharding.Mesh, shards: int
) -> dict[str, dict[str, jax.Array]]:
    """Zero per-shard partials for every metric (shapes from `jax.eval_shape`), on the mesh."""
    zeros = {name: metric_lib.init_state(m, shards=shards) for name, m in metric_shapes.items()}
    partials = jax.tree.map(lambda leaf: put(leaf, batch_sharding(mesh)), zeros)
    partials[BATCH_INDEX] = put_replicated({"index": np.zeros((), np.int32)}, mesh)
    return partials


def run_steps(
    step: Callable[..., Any],
    state: Any,
    batches: Iterable[tuple[Any, jax.Array, np.ndarray]],
    *,
    init: Callable[[Any], Any],
    max_in_flight: int,
    before_batch: Callable[[], None] | None = None,
) -> tuple[Any, transfer.RowStream, int]:
    """Dispatches `step` over placed batches with at most `max_in_flight` steps unfinished.

    Args:
      step: the jitted eval step.
      state: the placed `EvalState`.
      batches: (global batch, device mask, this process's host mask) triples.
      init: the zero accumulator for the first batch.
      max_in_flight: steps dispatched but not finished before the loop waits for the oldest.
      before_batch: called before each batch (e.g. raises when the evaluation must stop).

    Returns:
      (the accumulator or None when there was no batch, the rows on their way out, batch count).
    """
    accumulator = None
    rows_out = transfer.RowStream(lag=max_in_flight + 2)
    in_flight: collections.deque[jax.Array] = collections.deque()
    count = 0
    for batch, mask, host_mask in batches:
        count += 1
        if before_batch is not None:
            before_batch()
        if accumulator is None:
            accumulator = init(batch)
        accumulator, rows, done = step(state.params, state.mutable_variables, accumulator, batch, mask, state.rng)
        in_flight.append(done)
        if len(in_flight) > max_in_flight:
            in_flight.popleft().block_until_ready()
        if rows:
            rows_out.add(rows, host_mask)
    return accumulator, rows_out, count
