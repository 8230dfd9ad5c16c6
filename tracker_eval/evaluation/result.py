"""The one evaluation result that every logger, the ledger and the CLI share.

An `EvalResult` is what `ExtendedEvaluation.on_extended_evaluation_end` hands on: finalized scalar
metrics, per-example arrays in dataset order, and the provenance needed to trust a number later.

    result = EvalResult(step=300, checkpoint="/ckpt/300", metrics={"loss": 1.2},
                        per_example={"loss": np.array([...])}, provenance={...})
    result.to_json()  # {"step": 300, "checkpoint": ..., "metrics": {...}, ...}
"""

from __future__ import annotations

import dataclasses
import math
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Finalized metrics of one checkpoint (or one in-training evaluation).

    Attributes:
      step: the checkpoint's training step; trackers plot metrics against it.
      checkpoint: path (or URL) of the evaluated checkpoint, or a description such as
        ``"in-training"`` when the live train state was evaluated.
      metrics: scalar metrics by name (the eval function's names, no tracker prefix).
      per_example: un-reduced per-example arrays by name, one row per real example, dataset order.
      provenance: where the numbers came from: config hash, split, versions, mesh, host, wall time.
      time: unix time at which the metrics were finalized.
      suite: the evaluation suite that produced it; "" for the one evaluation of a config without
        ``suites`` (its metrics keep the keys ``<prefix>/<metric>``; a suite's are
        ``<prefix>/<suite>/<metric>``).
    """

    step: int
    checkpoint: str
    metrics: Mapping[str, float]
    per_example: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    time: float = dataclasses.field(default_factory=time.time)
    suite: str = ""

    def to_json(self, *, per_example_lists: bool = False) -> dict[str, Any]:
        """Returns a JSON-ready dict; per-example arrays become lists only when asked."""
        out: dict[str, Any] = {
            "step": int(self.step),
            "checkpoint": self.checkpoint,
            "metrics": {k: json_number(v) for k, v in self.metrics.items()},
            "provenance": dict(self.provenance),
            "time": self.time,
        }
        if self.suite:  # a result without a suite keeps today's form
            out["suite"] = self.suite
        if per_example_lists:
            out["metrics"].update({k: _json_list(v) for k, v in self.per_example.items()})
        return out

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, per_example: Mapping[str, np.ndarray] | None = None
    ) -> EvalResult:
        """Inverse of `to_json` (scalar part); per-example arrays are passed separately."""
        return cls(
            step=int(data["step"]),
            checkpoint=str(data["checkpoint"]),
            metrics={k: float(v) if v is not None else math.nan for k, v in data["metrics"].items()},
            per_example=dict(per_example or {}),
            provenance=dict(data.get("provenance", {})),
            time=float(data.get("time", time.time())),
            suite=str(data.get("suite", "")),
        )


def metric_key(prefix: str, suite: str, name: str) -> str:
    """A metric's key in trackers: ``<prefix>/<suite>/<name>``, without the parts that are empty."""
    return "/".join(part for part in (prefix, suite, name) if part)


def json_number(value: Any) -> float | int | None:
    """A metric as a JSON number; NaN and infinities become None because JSON has no such values."""
    number = float(value)
    if math.isfinite(number):
        return int(number) if isinstance(value, (int, np.integer)) else number
    return None


def _json_list(values: Any) -> Any:
    """Per-example values as (nested) JSON lists, non-finite floats as None like `json_number`."""
    array = np.asarray(values)
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return array.tolist()
    return np.where(np.isfinite(array), array, None).tolist()


def runtime_provenance(mesh: Any, *, global_batch_size: int) -> dict[str, Any]:
    """Versions, mesh and host of this process: what makes a number reproducible."""
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415

    import tracker_eval  # noqa: PLC0415

    return {
        "tracker_eval_version": tracker_eval.__version__,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "mesh_shape": dict(mesh.shape),
        "process_count": jax.process_count(),
        "host": socket.gethostname(),
        "global_batch_size": global_batch_size,
    }
