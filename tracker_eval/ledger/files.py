"""Durable files beside the ledger: per-example arrays in `.npz` files, per-sample records in JSONL
files, and exact JSON for results; and the same data as bytes for a ledger that keeps it in its
database (PostgreSQL, shared between machines that share no disk: `result_data`).

Arrays are written by `tracker_eval.npz` (temporary file, fsync, rename, directory fsync) before
the ledger commit that names them, so a committed path always points at a complete file. Samples
go the same way as a folder: one JSONL file per task and a manifest, written into a temporary
folder, fsynced, then renamed into place. Each write gets a fresh name: a writer that loses its
claim never overwrites a stored file.

    path = write_arrays(results_dir, stem="000300", arrays={"loss": np.ones(4, np.float32)})
    read_arrays(path)   # {"loss": array([1., 1., 1., 1.], dtype=float32)}
    folder = write_samples(results_dir, stem="000300", samples={"my_mc": [{"doc_id": 0, "acc": 1.0}]})
    read_samples(folder)   # {"my_mc": [{"doc_id": 0, "acc": 1.0}]}
    data = result_data(result)            # {"arrays": b"PK...", "samples": b"[...]"}: what the result has
    read_result_data(data)                # ({"loss": ...}, {"my_mc": [...]})
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tracker_eval.evaluation.result import EvalResult, sample_file_name, samples_jsonl
from tracker_eval.npz import npz_bytes, read_npz, write_npz

# JSON has no NaN or infinities; these spellings keep them exact instead of turning them into null.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_SAMPLES_MANIFEST = "tasks.json"


@dataclasses.dataclass(frozen=True)
class ResultFiles:
    """The files of one stored result, written before the ledger commit that names them.

    Attributes:
      arrays: the `.npz` of the per-example arrays, or None when the result has none.
      samples: the folder of the per-sample records, or None when the result has none.
    """

    arrays: Path | None = None
    samples: Path | None = None

    def discard(self) -> None:
        """Removes the files (the commit that would have named them did not happen)."""
        if self.arrays is not None:
            self.arrays.unlink(missing_ok=True)
        if self.samples is not None:
            shutil.rmtree(self.samples, ignore_errors=True)


def write_result_files(directory: Path, *, stem: str, result: EvalResult) -> ResultFiles:
    """Writes a result's per-example arrays and per-sample records durably (what it has of them).

    Raises:
      ValueError: an object array, or a sample that is not plain JSON.
    """
    arrays = write_arrays(directory, stem=stem, arrays=result.per_example) if result.per_example else None
    try:
        samples = write_samples(directory, stem=stem, samples=result.samples) if result.samples else None
    except BaseException:
        ResultFiles(arrays=arrays).discard()
        raise
    return ResultFiles(arrays=arrays, samples=samples)


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


def write_samples(directory: Path, *, stem: str, samples: Mapping[str, list[dict[str, Any]]]) -> Path:
    """Writes per-sample records durably to a new folder ``<stem>-<random>.samples`` in `directory`.

    The folder holds one JSONL file per task (`samples_jsonl`: a record a line) and ``tasks.json``,
    the task names in order with their files. It is built under a temporary name, every file and the folder are
    fsynced, and only then is it renamed into place: a folder under its final name is complete.

    Args:
      directory: where the folder goes; created if missing.
      stem: the start of the folder name (a random suffix follows).
      samples: task -> records; every record must be plain JSON.

    Returns:
      The path of the complete folder.

    Raises:
      ValueError: a record is not plain JSON (NaN, infinities, objects JSON cannot hold).
    """
    target = directory / f"{stem}-{secrets.token_hex(4)}.samples"
    temp = directory / f".{target.name}.tmp"
    temp.mkdir(parents=True)
    try:
        manifest, taken = [], {_SAMPLES_MANIFEST}
        for task, records in samples.items():
            name = sample_file_name(task, taken=taken)
            _write_durably(temp / name, samples_jsonl(task, records))
            manifest.append([str(task), name])
        _write_durably(temp / _SAMPLES_MANIFEST, json.dumps(manifest))
        _fsync_path(temp)
        os.replace(temp, target)
        _fsync_path(directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def read_samples(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Reads every task's records of a folder written by `write_samples`, in the order written."""
    manifest = json.loads((path / _SAMPLES_MANIFEST).read_text())
    return {task: [json.loads(line) for line in (path / name).read_text().splitlines()] for task, name in manifest}


def result_data(result: EvalResult) -> dict[str, bytes]:
    """A result's per-example arrays (an `.npz` archive) and per-sample records as bytes, by kind
    (``arrays``, ``samples``; a kind the result lacks is left out); equal data give equal bytes.

    Raises:
      ValueError: an object array, or a sample that is not plain JSON.
    """
    data = {}
    if result.per_example:
        data["arrays"] = npz_bytes(result.per_example)
    if result.samples:
        data["samples"] = _samples_bytes([(str(task), samples_jsonl(task, records))
                                          for task, records in result.samples.items()])
    return data


def folder_data(output_dir: Path, arrays_path: str | None, samples_path: str | None) -> dict[str, bytes]:
    """`result_data` of a result stored as files (paths relative to `output_dir`), read back
    byte for byte (`tracker-eval ledger copy` moves a SQLite ledger's results into a database)."""
    data = {}
    if arrays_path is not None:
        data["arrays"] = (output_dir / arrays_path).read_bytes()
    if samples_path is not None:
        folder = output_dir / samples_path
        manifest = json.loads((folder / _SAMPLES_MANIFEST).read_text())
        data["samples"] = _samples_bytes([(task, (folder / name).read_text()) for task, name in manifest])
    return data


def read_result_data(
    data: Mapping[str, bytes],
) -> tuple[dict[str, np.ndarray], dict[str, list[dict[str, Any]]]]:
    """(per-example arrays, per-sample records) of `result_data`'s bytes."""
    arrays = read_npz(bytes(data["arrays"])) if "arrays" in data else {}
    samples = {}
    if "samples" in data:
        for task, text in json.loads(bytes(data["samples"]).decode("utf-8")):
            samples[task] = [json.loads(line) for line in text.splitlines()]
    return arrays, samples


def _samples_bytes(tasks: list[tuple[str, str]]) -> bytes:
    # [[task, its JSONL text], ...]: the tasks' order kept, each record spelled as on disk.
    return json.dumps(tasks, ensure_ascii=True).encode("ascii")


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


def decode_result(
    text: str, *, per_example: Mapping[str, np.ndarray], samples: Mapping[str, list[dict[str, Any]]] | None = None
) -> EvalResult:
    """Inverse of `encode_result`; the per-example arrays come from `read_arrays`, the samples from
    `read_samples`."""
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
        samples=dict(samples or {}),
        alerts=tuple(data.get("alerts", ())),
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
