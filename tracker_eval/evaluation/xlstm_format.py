"""Metrics in xlstm-jax's format, taken as they are and reduced exactly, padding left out.

An eval function written for `xlstm_jax.trainer.callbacks.extended_evaluation` returns sums with
counts, or scalars that count 1, optionally with log modes, and may take any pytree as its batch:

    def eval_function(params, apply_fn, batch, rng):       # batch: e.g. Batch(inputs=..., targets=...)
        logits = apply_fn({"params": params}, batch.inputs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
        return {
            "loss": {"value": loss.sum(), "count": loss.size},          # loss = sum(value) / sum(count)
            "top1": (logits.argmax(-1) == batch.targets).mean(),        # a scalar counts 1
            "sequence_loss": {"value": loss.sum(-1), "count": loss.shape[0],
                              "log_modes": ("single_noreduce",)},       # per-example rows
        }, None

Why row by row: the sums are user code over the whole batch, so the padding rows of a short last
batch would be inside them, and no mask can take them out afterwards. A function that returns any
metric this way is therefore evaluated under `vmap` on batches of one example each: every
example's {"value", "count"} is its own, and padding rows are masked out like per-example values.
A sum over a batch is the sum over its rows, so the result is that of the function over the real
examples only, the same on any mesh and batch size. The vmapped axis is split over the batch mesh
axes (`spmd_axis_name`), so the step stays data-parallel.

Output names follow xlstm-jax's `get_metrics`: `name` for the default `mean_nopostfix`, else
`name_<mode>`. Per-batch statistics (`single`, `max`, `std`) are refused: their values depend on
the batch size and mesh, and a stream's metrics must not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tracker_eval.evaluation.metrics import Metric, PerExample, Ratio, check_metrics
from tracker_eval.evaluation.sharding import batch_axes

DEFAULT_LOG_MODES = ("mean_nopostfix",)
MEAN_MODES = ("mean_nopostfix", "mean")
ROW_MODES = ("single_noreduce", "single_noreduce_wcount")
PER_BATCH_MODES = ("single", "max", "std")
KEYS = ("value", "count", "log_modes")

EvalCall = Callable[[Any], Any]  # batch -> the eval function's (metrics, mutable)


class MetricReader:
    """Turns one eval function call into metric kinds, whichever format the function returns.

    The format is found once, by tracing the function abstractly on the first batch (nothing is
    computed). Functions returning only `tracker_eval.metrics` kinds run on the whole batch as
    before; a function returning any xlstm-jax metric runs row by row.
    """

    def __init__(self) -> None:
        self.row_by_row: bool | None = None

    def __call__(self, call: EvalCall, batch: Any) -> dict[str, Metric]:
        """Metric kinds of one batch, with the batch axis first.

        Args:
          call: batch -> (metrics, mutable), the eval function with params and rng bound.
          batch: the placed global batch (any pytree whose leaves have the batch axis first).

        Raises:
          TypeError: output that is neither format, naming the metric and the fix.
          ValueError: an unsupported log mode or two outputs of the same name.
        """
        if self.row_by_row is None:
            self.row_by_row = _uses_xlstm_format(call, batch)
        if not self.row_by_row:
            return dict(check_metrics(metrics_of(call(batch))))
        return _row_by_row(call, batch)


def metrics_of(output: Any) -> Mapping[str, Any]:
    """The metrics dict of an eval function's `(metrics, mutable)` output.

    Raises:
      TypeError: when the output is not such a pair.
    """
    if not (isinstance(output, tuple) and len(output) == 2):
        raise TypeError("eval_function must return a pair (metrics dict, mutable variables or None)")
    if not isinstance(output[0], Mapping):
        raise TypeError(
            f"eval_function must return (dict of metrics, mutable); got {type(output[0]).__name__} first"
        )
    return output[0]


def is_xlstm_metric(metric: Any) -> bool:
    """Whether `metric` is given the xlstm-jax way: a {"value", ...} mapping or a scalar."""
    if isinstance(metric, Metric):
        return False
    if isinstance(metric, Mapping):
        return True
    return isinstance(metric, (int, float)) or getattr(metric, "ndim", None) == 0


def _uses_xlstm_format(call: EvalCall, batch: Any) -> bool:
    found: list[bool] = []

    def probe(abstract_batch: Any) -> None:
        metrics = metrics_of(call(abstract_batch))
        found.append(any(is_xlstm_metric(m) for m in metrics.values()))

    jax.eval_shape(probe, batch)
    return found[0]


def _row_by_row(call: EvalCall, batch: Any) -> dict[str, Metric]:
    """The function on each example alone (a batch of one), under vmap; kinds per example."""
    layout: dict[str, tuple[str, ...] | None] = {}  # name -> xlstm-jax log modes, None for our kinds

    def one_example(row: Any) -> dict[str, Any]:
        metrics = metrics_of(call(jax.tree.map(lambda leaf: leaf[None], row)))
        out: dict[str, Any] = {}
        for name, metric in metrics.items():
            if is_xlstm_metric(metric):
                value, count, layout[name] = _parts(name, metric)
                out[name] = {"value": value, "count": count}
            else:
                check_metrics({name: metric})
                layout[name] = None
                out[name] = _with_full_weights(metric)
        return out

    # The step runs with its mesh current (`jax.set_mesh`), so its batch axes are known here.
    rows = jax.vmap(one_example, spmd_axis_name=batch_axes(jax.sharding.get_abstract_mesh()))(batch)
    kinds: dict[str, Metric] = {}
    for name, modes in layout.items():
        if modes is None:
            _add(kinds, name, jax.tree.map(_merge_example_axis, rows[name]))
            continue
        value, count = rows[name]["value"], rows[name]["count"]
        for mode in modes:
            key = name if mode == "mean_nopostfix" else f"{name}_{mode}"
            if mode in MEAN_MODES:
                ratio = Ratio(_one_per_row(name, value, part="value"), counts=_one_per_row(name, count, part="count"))
                _add(kinds, key, ratio)
            else:
                _add(kinds, key, PerExample(_merge_example_axis(value)))
                if mode == "single_noreduce_wcount":
                    _add(kinds, f"{key}_count", PerExample(_merge_example_axis(count)))
    return kinds


def _parts(name: str, metric: Any) -> tuple[jax.Array, jax.Array, tuple[str, ...]]:
    """(value, count, log modes) of one xlstm-jax metric, checked; floating values as float32."""
    if isinstance(metric, Mapping):
        extra = sorted(set(metric) - set(KEYS))
        if "value" not in metric or extra:
            raise TypeError(
                f"eval_function metric {name!r} has keys {sorted(metric)}; an xlstm-jax metric is "
                "{'value': sum, 'count': n, 'log_modes': (...)} with count and log_modes optional"
            )
        value, count, modes = metric["value"], metric.get("count", 1), metric.get("log_modes")
    else:
        value, count, modes = metric, 1, None
    modes = DEFAULT_LOG_MODES if modes is None else (modes,) if isinstance(modes, str) else tuple(modes)
    for mode in modes:
        if mode in PER_BATCH_MODES:
            raise ValueError(
                f"eval_function metric {name!r} asks for log mode {mode!r}, a statistic over batches whose value "
                "depends on batch size and mesh; use mean_nopostfix (the default) or mean, which are exact"
            )
        if mode not in MEAN_MODES + ROW_MODES:
            raise ValueError(
                f"eval_function metric {name!r} has log mode {mode!r}; use one of "
                f"{', '.join(MEAN_MODES + ROW_MODES)}"
            )
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(jnp.float32)  # as xlstm-jax's update_metrics does
    return value, jnp.asarray(count), modes


def _with_full_weights(metric: Metric) -> Metric:
    """A metric whose weights (if any) have the values' shape, so both lose the same example axis."""
    weights = getattr(metric, "weights", None)
    if weights is None:
        return metric
    return metric.replace(weights=jnp.broadcast_to(weights, jnp.shape(metric.values)))


def _merge_example_axis(rows: jax.Array) -> jax.Array:
    """(batch, 1, ...) -> (batch, ...): the one-example batch axis of each row folds into the batch."""
    if rows.ndim >= 2 and rows.shape[1] == 1:
        return rows.reshape(rows.shape[:1] + rows.shape[2:])
    return rows


def _one_per_row(name: str, rows: jax.Array, *, part: str) -> jax.Array:
    """The (batch,) numbers of a summed metric: each example must give exactly one."""
    if math.prod(rows.shape[1:]) != 1:
        raise TypeError(
            f"eval_function metric {name!r}: its {part} must be one number per batch (a sum) for log mode "
            f"mean, but one example gives shape {tuple(rows.shape[1:])}; give per-example values "
            "log_modes=('single_noreduce',)"
        )
    return rows.reshape(rows.shape[0])


def _add(kinds: dict[str, Metric], key: str, metric: Metric) -> None:
    if key in kinds:
        raise ValueError(
            f"eval_function returns two metrics named {key!r} (log modes other than mean_nopostfix add "
            "_<mode> to the name); rename one"
        )
    kinds[key] = metric
