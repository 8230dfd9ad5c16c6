"""Metric kinds built inside an eval function, accumulated on device, finalized on the host.

An eval function returns a dict of metrics built from per-example arrays whose leading axis is
the batch axis; the framework masks padding rows itself, so users never see them:

    def eval_fn(params, apply_fn, batch, rng):
        logits = apply_fn({"params": params}, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return {
            "loss": Mean(loss),
            "accuracy": Mean(logits.argmax(-1) == batch["y"]),
            "worst_loss": Max(loss),
            "example_loss": PerExample(loss),
        }, None

Why compensated sums: float32 running sums lose digits after ~10^7 values and int32 counts wrap
at 2^31. Each batch's partial sum is added with a TwoSum error term kept in a second float32, so
an accumulator carries ~48 significant bits (counts exact to 2^48) without enabling x64 globally.
Why per-shard partials: each device accumulates its own rows, so the eval step has no
cross-device reduction at all; the host adds the partials once, in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Metric:
    """Base class of metric kinds; `values` has the batch axis first."""

    values: jax.Array


@struct.dataclass
class Mean(Metric):
    """Weighted mean over all real elements: sum(values * weights) / sum(weights).

    `weights` broadcasts against `values` (e.g. a token mask of shape (batch, seq)).
    """

    weights: jax.Array | None = None


@struct.dataclass
class Sum(Metric):
    """Sum over all real elements (e.g. a token count)."""


@struct.dataclass
class Max(Metric):
    """Maximum over all real elements; correct for all-negative values."""


@struct.dataclass
class Min(Metric):
    """Minimum over all real elements."""


@struct.dataclass
class PerExample(Metric):
    """Un-reduced values: one row per real example, returned in dataset order."""


@struct.dataclass
class Ratio(Metric):
    """sum(values) / sum(counts) over all real elements: how xlstm-jax's {"value", "count"} sums
    reduce (see `tracker_eval.evaluation.xlstm_format`). `counts` broadcasts against `values`."""

    counts: jax.Array


def two_sum_add(acc: jax.Array, value: jax.Array) -> jax.Array:
    """Adds `value` to compensated accumulators `acc` of shape (..., 2) = (high, low).

    Knuth's TwoSum gives the exact rounding error of `high + value`; it is folded into `low`
    and renormalized, so the pair keeps about twice float32's precision.
    """
    high, low = acc[..., 0], acc[..., 1]
    total = high + value
    back = total - high
    error = (high - (total - back)) + (value - back)
    low = low + error
    new_high = total + low
    new_low = low - (new_high - total)
    return jnp.stack([new_high, new_low], axis=-1)


def _real_mask(mask: jax.Array, values: jax.Array) -> jax.Array:
    """The (batch,) example mask broadcast to `values`' shape."""
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - 1)), values.shape)


def _extreme(dtype: Any, *, largest: bool) -> Any:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.inf if largest else -jnp.inf
    if dtype == jnp.bool_:
        return largest
    info = jnp.iinfo(dtype)
    return info.max if largest else info.min


def _per_shard(values: jax.Array, shards: int, reduce: Any) -> jax.Array:
    """Reduces everything but the batch shards: shape (shards,), one partial per batch shard.

    The batch axis is split into `shards` contiguous blocks, exactly as the mesh splits it, so
    each device reduces only its own rows: the step needs no cross-device collective, and the
    host combines the partials once at the end.
    """
    return reduce(values.reshape(shards, -1), axis=1)


def init_state(metric: Metric, *, shards: int = 1) -> dict[str, np.ndarray]:
    """Zero accumulator for one metric (works on ShapeDtypeStructs from `jax.eval_shape`).

    Args:
      metric: the metric (only its kind and dtype matter).
      shards: batch shards of the mesh (data x fsdp); every part keeps one partial per shard.
    """
    # Distinct arrays per part: the accumulator is donated, and one buffer may be donated once.
    if isinstance(metric, (Mean, Ratio)):
        return {"sum": np.zeros((shards, 2), np.float32), "weight": np.zeros((shards, 2), np.float32)}
    if isinstance(metric, Sum):
        return {"sum": np.zeros((shards, 2), np.float32)}
    if isinstance(metric, Max):
        return {"max": np.full((shards,), _extreme(metric.values.dtype, largest=False), metric.values.dtype)}
    if isinstance(metric, Min):
        return {"min": np.full((shards,), _extreme(metric.values.dtype, largest=True), metric.values.dtype)}
    if isinstance(metric, PerExample):
        return {}
    raise TypeError(
        f"metric of type {type(metric).__name__} is not a metric kind; use Mean, Sum, Max, Min or PerExample"
    )


def update_state(state: dict[str, jax.Array], metric: Metric, mask: jax.Array) -> dict[str, jax.Array]:
    """Folds one batch into the accumulator; padding rows (mask False) never count.

    Masking uses `where`, not multiplication, so NaN/Inf in padding rows cannot leak in. The
    number of shards is the accumulator's leading size.
    """
    values = jnp.asarray(metric.values)
    if isinstance(metric, PerExample):
        return state
    shards = next(iter(state.values())).shape[0]
    real = _real_mask(mask, values)
    if isinstance(metric, Mean):
        weights = jnp.ones_like(values, jnp.float32) if metric.weights is None else metric.weights
        weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), values.shape)
        weights = jnp.where(real, weights, 0.0)
        weighted = jnp.where(real, values.astype(jnp.float32) * weights, 0.0)
        return {
            "sum": two_sum_add(state["sum"], _per_shard(weighted, shards, jnp.sum)),
            "weight": two_sum_add(state["weight"], _per_shard(weights, shards, jnp.sum)),
        }
    if isinstance(metric, Ratio):
        counts = jnp.broadcast_to(jnp.asarray(metric.counts, jnp.float32), values.shape)
        summed = jnp.where(real, values.astype(jnp.float32), 0.0)
        return {
            "sum": two_sum_add(state["sum"], _per_shard(summed, shards, jnp.sum)),
            "weight": two_sum_add(state["weight"], _per_shard(jnp.where(real, counts, 0.0), shards, jnp.sum)),
        }
    if isinstance(metric, Sum):
        summed = _per_shard(jnp.where(real, values.astype(jnp.float32), 0.0), shards, jnp.sum)
        return {"sum": two_sum_add(state["sum"], summed)}
    if isinstance(metric, Max):
        low = _extreme(values.dtype, largest=False)
        return {"max": jnp.maximum(state["max"], _per_shard(jnp.where(real, values, low), shards, jnp.max))}
    if isinstance(metric, Min):
        high = _extreme(values.dtype, largest=True)
        return {"min": jnp.minimum(state["min"], _per_shard(jnp.where(real, values, high), shards, jnp.min))}
    raise TypeError(f"unknown metric kind {type(metric).__name__}")


def check_metrics(metrics: Any) -> Mapping[str, Metric]:
    """Validates an eval function's first output.

    Raises:
      TypeError: naming the offending key and the valid kinds.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"eval_function must return (dict[str, Metric], mutable); got {type(metrics).__name__} first"
        )
    for name, metric in metrics.items():
        if not isinstance(metric, Metric):
            shape = getattr(metric, "shape", None)
            what = f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(metric).__name__}"
            raise TypeError(
                f"eval_function metric {name!r} is {what}; wrap it in "
                "tracker_eval.metrics.Mean, Sum, Max, Min or PerExample, or return it the xlstm-jax way: "
                '{"value": sum, "count": n} or a scalar'
            )
    return metrics


def kinds_of(metrics: Mapping[str, Metric]) -> dict[str, str]:
    """Metric name -> kind name, the static description the host needs to finalize."""
    return {name: type(metric).__name__ for name, metric in metrics.items()}


def host_state(device_state: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Combines a fetched accumulator's per-shard partials into exact host values.

    Compensated pairs become float64 `high + low`, summed over shards; extremes take the extreme
    over shards.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, parts in device_state.items():
        out[name] = {}
        for part, value in parts.items():
            arr = np.asarray(value)
            if part in ("sum", "weight"):
                out[name][part] = float(np.sum(arr[..., 0].astype(np.float64) + arr[..., 1].astype(np.float64)))
            elif part == "max":
                out[name][part] = np.max(arr)
            elif part == "min":
                out[name][part] = np.min(arr)
            else:
                out[name][part] = arr[()]
    return out


def merge_host(kind: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """Merges two host accumulators of one metric (e.g. over data loaders or processes)."""
    if old is None or not old:
        return dict(new)
    if kind in ("Mean", "Ratio", "Sum"):
        return {part: old[part] + new[part] for part in new}
    if kind == "Max":
        return {"max": max(old["max"], new["max"])}
    if kind == "Min":
        return {"min": min(old["min"], new["min"])}
    return dict(new)


def finalize_value(kind: str, state: Mapping[str, Any]) -> float:
    """A host accumulator's final number; the mean of nothing is NaN, not an error."""
    if kind in ("Mean", "Ratio"):
        return state["sum"] / state["weight"] if state["weight"] else float("nan")
    if kind == "Sum":
        return state["sum"]
    if kind == "Max":
        return _python_number(state["max"])
    if kind == "Min":
        return _python_number(state["min"])
    raise ValueError(f"{kind} has no scalar value")


def merge_fetched(
    kinds: Mapping[str, str], aggregated: Mapping[str, Any], fetched: Mapping[str, Any]
) -> dict[str, Any]:
    """`aggregated` with a fetched accumulator (``{"reduced", "per_example"}``) merged in, on the host.

    Per-example rows are concatenated in order; reduced states merge by kind, so several loaders
    (or several processes' states) combine exactly.
    """
    out = {name: dict(value) for name, value in aggregated.items()}
    for name, state in host_state(fetched.get("reduced", {})).items():
        out[name] = merge_host(kinds[name], out.get(name), state)
    for name, rows in fetched.get("per_example", {}).items():
        previous = out.get(name, {}).get("rows")
        out[name] = {"rows": rows if previous is None else np.concatenate([previous, rows])}
    return out


def finalize_all(
    kinds: Mapping[str, str], aggregated: Mapping[str, Any],
    finalize_fn: Callable[[dict[str, float]], Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Final numbers: scalars as Python numbers, per-example metrics as arrays, `finalize_fn`'s added."""
    final: dict[str, Any] = {}
    for name, state in aggregated.items():
        if kinds.get(name) == "PerExample":
            if "rows" in state:  # absent on processes other than 0, which receive no rows
                final[name] = state["rows"]
        else:
            final[name] = finalize_value(kinds[name], state)
    if finalize_fn is not None:
        scalars = {k: v for k, v in final.items() if not isinstance(v, np.ndarray)}
        final.update(finalize_fn(dict(scalars)))
    return final


def _python_number(value: Any) -> float:
    number = np.asarray(value)
    if number.dtype == np.bool_:
        return float(number)
    return float(number) if np.issubdtype(number.dtype, np.floating) else int(number)
