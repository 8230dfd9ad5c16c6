"""The one evaluation result that every logger, the ledger and the CLI share.

An `EvalResult` is what `ExtendedEvaluation.on_extended_evaluation_end` hands on: finalized scalar
metrics, per-example arrays in dataset order, and the provenance needed to trust a number later. A
suite's result (e.g. the LM Evaluation Harness) also names its suite and may carry per-sample
records: task -> JSON records, stored beside the ledger and logged as artifacts or tables.

    result = EvalResult(step=300, checkpoint="/ckpt/300", metrics={"loss": 1.2},
                        per_example={"loss": np.array([...])}, provenance={...})
    result.to_json()  # {"step": 300, "checkpoint": ..., "metrics": {...}, ...}
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import socket
import time
from collections.abc import Mapping, Sequence
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
      samples: per-sample records by task (lm-eval's ``samples``: document, arguments, responses,
        filtered responses, per-sample metrics), each record a dict of JSON values (str, int, float,
        bool, None, lists, dicts with str keys; no NaN or infinities). Stored with the result and
        logged by trackers that can show them (MLflow artifacts, W&B tables).
      suite_version: which set of the suite's number-changing options produced it, counted by the
        ledger (1 = the first); trackers key version N > 1 apart (`tracker_eval.identity`).
      alerts: regression alerts raised for this step (`tracker_eval.runners.alerts`), each a dict of
        JSON values with a ``message``; stored with the result, so each tracker gets them exactly
        once, with the result's delivery.
    """

    step: int
    checkpoint: str
    metrics: Mapping[str, float]
    per_example: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    time: float = dataclasses.field(default_factory=time.time)
    suite: str = ""
    samples: Mapping[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    suite_version: int = 1
    alerts: tuple[Mapping[str, Any], ...] = ()

    def to_json(self, *, per_example_lists: bool = False) -> dict[str, Any]:
        """Returns a JSON-ready dict; per-example arrays become lists only when asked.

        The per-sample records are never part of it (they can be large; the ledger, the JSONL
        logger and the trackers keep them in files of their own). ``suite`` is present only when set,
        so the dict of a stream's own result is unchanged.
        """
        out: dict[str, Any] = {
            "step": int(self.step),
            "checkpoint": self.checkpoint,
            "metrics": {k: json_number(v) for k, v in self.metrics.items()},
            "provenance": dict(self.provenance),
            "time": self.time,
        }
        if self.suite:  # a result without a suite keeps today's form
            out["suite"] = self.suite
        if self.suite_version != 1:
            out["suite_version"] = int(self.suite_version)
        if self.alerts:  # likewise a result without alerts
            out["alerts"] = [dict(alert) for alert in self.alerts]
        if per_example_lists:
            out["metrics"].update({k: _json_list(v) for k, v in self.per_example.items()})
        return out

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, per_example: Mapping[str, np.ndarray] | None = None,
        samples: Mapping[str, list[dict[str, Any]]] | None = None,
    ) -> EvalResult:
        """Inverse of `to_json` (scalar part); per-example arrays and samples are passed separately."""
        return cls(
            step=int(data["step"]),
            checkpoint=str(data["checkpoint"]),
            metrics={k: float(v) if v is not None else math.nan for k, v in data["metrics"].items()},
            per_example=dict(per_example or {}),
            provenance=dict(data.get("provenance", {})),
            time=float(data.get("time", time.time())),
            suite=str(data.get("suite", "")),
            samples=dict(samples or {}),
            suite_version=int(data.get("suite_version", 1)),
            alerts=tuple(data.get("alerts", ())),
        )


def metric_key(prefix: str, suite: str, name: str) -> str:
    """A metric's key in trackers: ``<prefix>/<suite>/<name>``, without the parts that are empty."""
    return "/".join(part for part in (prefix, suite, name) if part)


def samples_jsonl(task: str, records: Sequence[Any]) -> str:
    """One task's per-sample records as JSONL text: a record a line, exact JSON, ASCII only.

    The one spelling of samples on disk: the ledger, the JSONL logger and the MLflow artifacts all
    write it, so a file read back with `json.loads` per line gives the records that went in.

    Raises:
      ValueError: a record is not plain JSON (NaN, infinities, objects JSON cannot hold), naming
        the task and the record's index.
    """
    lines = []
    for number, record in enumerate(records):
        try:
            lines.append(json.dumps(record, allow_nan=False) + "\n")
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"sample {number} of task {task!r} cannot be stored as JSON ({error}); keep sample values to "
                "str, int, finite float, bool, None, lists and dicts (lm-eval's records pass through json_safe)"
            ) from error
    return "".join(lines)


def sample_file_name(task: str, *, taken: set[str] | None = None) -> str:
    """A file name ``<task>.jsonl`` safe on any file system and in artifact paths.

    Characters other than letters, digits, ``_``, ``.`` and ``-`` become ``_``; a name already in
    `taken` (two tasks that differ only in such characters) gets ``-2``, ``-3``, ... and is added to it.
    """
    stem = _UNSAFE_FILE_CHARS.sub("_", str(task))[:100].lstrip(".") or "_"
    name, count = f"{stem}.jsonl", 1
    while taken is not None and name in taken:
        count += 1
        name = f"{stem}-{count}.jsonl"
    if taken is not None:
        taken.add(name)
    return name


_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


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
