"""Per-example values of two stored results, paired by example identity.

    pairs = paired_values(result_a, result_b, suite="val")
    pairs["loss"].a, pairs["loss"].b      # float64 arrays, example i of A beside example i of B

What identifies an example:
- per-example arrays (`PerExample`) are rows in the data's order; a result that also has the array
  ``example_id`` (one id per row) is paired by those ids, whatever order the rows came in;
  otherwise by row index, which is the example's identity because both steps come from one stream
  (the same data, split and eval function; the ledger keys streams by them). An array
  ``example_<metric>`` behind a mean metric is named by that metric (``loss``), any other 1-D array
  by its own name.
- the harness's per-sample records are paired by (``doc_id``, filter), named like the suite's
  metrics: ``<task>/<metric>`` (filter ``none``) or ``<task>/<filter>/<metric>``.

Two steps whose example sets differ cannot be paired: `PairingError` names the suite and what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.paired import PER_EXAMPLE_PREFIX, backing_values

EXAMPLE_ID = "example_id"
# Fields of lm-eval's sample records that are not per-sample metrics.
_NOT_METRICS = {"doc_id", "filter", "doc", "target", "arguments", "resps", "filtered_resps", "doc_hash",
                "prompt_hash", "target_hash", "metrics"}


class PairingError(ConfigError):
    """The two steps' examples cannot be paired (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Paired:
    """One metric's per-example values at A and B, the same example at each index."""

    a: np.ndarray
    b: np.ndarray


def paired_values(a: EvalResult, b: EvalResult, *, suite: str) -> dict[str, Paired]:
    """Every metric with per-example values at both steps, paired by example identity.

    Raises:
      PairingError: the steps' example sets differ (naming `suite`, both steps and the difference).
    """
    out = _paired_arrays(a, b, suite=suite)
    out.update(_paired_samples(a, b, suite=suite))
    return out


def _paired_arrays(a: EvalResult, b: EvalResult, *, suite: str) -> dict[str, Paired]:
    names = [name for name in a.per_example if name != EXAMPLE_ID and name in b.per_example
             and _is_column(a.per_example[name]) and _is_column(b.per_example[name])]
    if not names:
        return {}
    order_a, order_b = _row_order(a, b, suite=suite, count_a=len(a.per_example[names[0]]),
                                  count_b=len(b.per_example[names[0]]))
    backed = set(backing_values(a.metrics, a.per_example)) & set(backing_values(b.metrics, b.per_example))
    out: dict[str, Paired] = {}
    for name in names:
        values_a, values_b = a.per_example[name], b.per_example[name]
        if len(values_a) != len(order_a) or len(values_b) != len(order_b):
            raise PairingError(f"suite {_label(suite)}: per-example array {name!r} has {len(values_a)} rows at step "
                               f"{a.step} and {len(values_b)} at step {b.step}, other arrays {len(order_a)}")
        metric = name[len(PER_EXAMPLE_PREFIX):] if name.startswith(PER_EXAMPLE_PREFIX) else name
        out[metric if metric in backed else name] = Paired(
            a=np.asarray(values_a, np.float64)[order_a], b=np.asarray(values_b, np.float64)[order_b])
    return out


def _row_order(a: EvalResult, b: EvalResult, *, suite: str, count_a: int, count_b: int) -> tuple[Any, Any]:
    """Indices that put both steps' rows in one example order."""
    ids_a, ids_b = a.per_example.get(EXAMPLE_ID), b.per_example.get(EXAMPLE_ID)
    if ids_a is None or ids_b is None:
        if count_a != count_b:
            raise PairingError(
                f"suite {_label(suite)}: step {a.step} has {count_a} examples and step {b.step} has {count_b}; "
                "only steps evaluated on the same examples can be compared")
        return np.arange(count_a), np.arange(count_b)
    ids_a, ids_b = np.asarray(ids_a).reshape(-1), np.asarray(ids_b).reshape(-1)
    _same_ids(suite, a.step, b.step, ids_a.tolist(), ids_b.tolist())
    return np.argsort(ids_a, kind="stable"), np.argsort(ids_b, kind="stable")


def _paired_samples(a: EvalResult, b: EvalResult, *, suite: str) -> dict[str, Paired]:
    out: dict[str, Paired] = {}
    for task in a.samples:
        if task not in b.samples:
            continue
        by_a, by_b = _by_document(a.samples[task]), _by_document(b.samples[task])
        _same_ids(suite, a.step, b.step, list(by_a), list(by_b), what=f"task {task!r}: documents")
        keys = sorted(by_a)
        metrics = _numeric_fields(by_a.values()) & _numeric_fields(by_b.values())
        for key in sorted(metrics):
            for filter_name in sorted({doc[1] for doc in keys}):
                docs = [doc for doc in keys if doc[1] == filter_name]
                name = f"{task}/{key}" if filter_name == "none" else f"{task}/{filter_name}/{key}"
                out[name] = Paired(a=np.asarray([float(by_a[doc][key]) for doc in docs], np.float64),
                                   b=np.asarray([float(by_b[doc][key]) for doc in docs], np.float64))
    return out


def _by_document(records: list[Mapping[str, Any]]) -> dict[tuple[Any, str], Mapping[str, Any]]:
    return {(record.get("doc_id"), str(record.get("filter", "none"))): record for record in records}


def _numeric_fields(records: Any) -> set[str]:
    """Fields that are a number (bool included) in every record."""
    found: set[str] | None = None
    for record in records:
        numeric = {key for key, value in record.items()
                   if key not in _NOT_METRICS and isinstance(value, (int, float)) and value == value}
        found = numeric if found is None else found & numeric
    return found or set()


def _same_ids(suite: str, step_a: int, step_b: int, ids_a: list[Any], ids_b: list[Any],
              what: str = "example ids") -> None:
    if len(set(ids_a)) != len(ids_a) or len(set(ids_b)) != len(ids_b):
        raise PairingError(f"suite {_label(suite)}: {what} repeat within a step; each example needs one id")
    only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
    if only_a or only_b:
        raise PairingError(
            f"suite {_label(suite)}: {what} differ between steps {step_a} and {step_b} "
            f"({len(only_a)} only at {step_a}, e.g. {_first(only_a)}; {len(only_b)} only at {step_b}, "
            f"e.g. {_first(only_b)}); only steps evaluated on the same examples can be compared")


def _is_column(values: Any) -> bool:
    array = np.asarray(values)
    return array.ndim == 1 and array.size >= 2 and array.dtype.kind in "biuf"


def _first(ids: set[Any]) -> str:
    return repr(sorted(ids, key=repr)[0]) if ids else "-"


def _label(suite: str) -> str:
    return repr(suite) if suite else "'' (the config's one evaluation)"
