"""Durable files beside the ledger: per-example arrays in `.npz` files, and exact JSON for results.

Arrays are written by `tracker_eval.npz` (temporary file, fsync, rename, directory fsync) before
the ledger commit that names them, so a committed path always points at a complete file. Each
write gets a fresh name: a writer that loses its claim never overwrites a stored file.

    path = write_arrays(results_dir, stem="000300", arrays={"loss": np.ones(4, np.float32)})
    read_arrays(path)   # {"loss": array([1., 1., 1., 1.], dtype=float32)}
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.npz import read_npz, write_npz

# JSON has no NaN or infinities; these spellings keep them exact instead of turning them into null.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def write_arrays(directory: Path, *, stem: str, arrays: Mapping[str, np.ndarray]) -> Path:
    """Writes arrays durably to a new `.npz` file in `directory` (through `tracker_eval.npz`).

    Args:
      directory: where the file goes; created if missing.
      stem: the start of the file name (a random suffix follows).
      arrays: arrays by name (any name); insertion order is kept in the file.

    Returns:
      The path of the complete, fsynced file.

    Raises:
      ValueError: an array has dtype object, which `.npz` can only hold by pickling.
    """
    return write_npz(directory / f"{stem}-{secrets.token_hex(4)}.npz", arrays)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Reads every array of an `.npz` file written by `write_arrays`, in file order."""
    return read_npz(path)


def encode_result(result: EvalResult) -> str:
    """The scalar part of a result as JSON, keeping NaN and infinities exact.

    Raises:
      ValueError: the provenance holds a value that JSON cannot represent.
    """
    data = result.to_json()
    data["metrics"] = {name: encode_number(value) for name, value in result.metrics.items()}
    try:
        return json.dumps(data, default=_json_default, allow_nan=False, sort_keys=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"result of step {result.step} cannot be stored as JSON ({error}); keep provenance "
            "values to str, int, float, bool, lists and dicts"
        ) from error


def decode_result(text: str, *, per_example: Mapping[str, np.ndarray]) -> EvalResult:
    """Inverse of `encode_result`; the per-example arrays come from `read_arrays`."""
    data = json.loads(text)
    metrics = {name: decode_number(value) for name, value in data["metrics"].items()}
    return EvalResult(
        step=int(data["step"]),
        checkpoint=str(data["checkpoint"]),
        metrics=metrics,
        per_example=dict(per_example),
        provenance=dict(data.get("provenance", {})),
        time=float(data["time"]),
        suite=str(data.get("suite", "")),
    )


def decoded_metrics(text: str) -> dict[str, float]:
    """Only the scalar metrics of an encoded result."""
    return {name: decode_number(value) for name, value in json.loads(text)["metrics"].items()}


def encode_number(value: Any) -> float | str:
    """A float, or its JSON-safe spelling ("NaN", "Infinity", "-Infinity") when not finite."""
    number = float(value)
    if math.isfinite(number):
        return number
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


def decode_number(value: float | str | None) -> float:
    """Inverse of `encode_number`; None (as `EvalResult.to_json` writes NaN) reads as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        return _NON_FINITE[value]
    return float(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} value {value!r} is not JSON serializable")
