"""lm-eval's results as tracker metrics and JSON-safe per-sample records.

    metrics = metric_values(results)    # {"my_mc/acc": 0.5, "my_gen/strict-match/exact_match": 0.2, ...}
    samples = json_safe(results["samples"])

lm-eval keys a metric `"<metric>,<filter>"`. Here it becomes `<task>/<metric>` when the filter is
`none` (tasks without a filter list) and `<task>/<filter>/<metric>` otherwise (commas are not valid
in tracker metric names). Group scores are named like tasks. Non-numeric values (lm-eval's "N/A"
stderr when it computes none) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def metric_values(results: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric task and group metric of an lm-eval results dict."""
    out: dict[str, float] = {}
    tables = [results.get("results", {}), results.get("groups", {})]
    for table in tables:
        for task, values in table.items():
            for key, value in values.items():
                metric, comma, filter_name = key.partition(",")
                if not comma or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                    continue
                name = f"{task}/{metric}" if filter_name == "none" else f"{task}/{filter_name}/{metric}"
                out[name] = float(value)
    return dict(sorted(out.items()))


def json_safe(value: Any) -> Any:
    """`value` as plain JSON: tuples become lists, numpy scalars numbers, NaN and infinities None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)
