"""JSONL logger: one line per evaluation in ``metrics.jsonl``, per-example arrays in ``.npz`` and
per-sample records in JSONL files beside it.

Each line is written with one ``os.write`` on an ``O_APPEND`` descriptor and fsynced on flush, so a
reader sees whole lines only (a crash can leave at most one unterminated last line, which
`read_jsonl` skips). A result whose `tracker_eval.identity.delivery_key` (step, checkpoint, suite
and its version) is already in the file is not written again; the file is read again whenever this
process takes over delivery (`reconcile`). A suite's records carry ``"suite"`` (and
``"suite_version"`` from its second version on); those of a config without suites have neither.

    logger = JsonlLogger(JsonlLogger.Config(), context=LoggerContext(output_dir="runs/demo"), name="jsonl")
    logger.log_result(result); logger.flush()
    records = read_jsonl("runs/demo/metrics.jsonl")
    arrays = load_per_example("runs/demo/metrics.jsonl", records[0])  # {"loss": array([...])}
    samples = load_samples("runs/demo/metrics.jsonl", records[0])      # {"my_mc": [{...}, ...]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from tracker_eval.evaluation.result import EvalResult, sample_file_name, samples_jsonl
from tracker_eval.identity import delivery_key, record_key, tracker_suite
from tracker_eval.loggers.base import LoggerContext
from tracker_eval.npz import read_npz, write_npz


@dataclasses.dataclass(frozen=True)
class JsonlConfig:
    """Options of ``type: jsonl``."""

    path: str | None = None
    """File to append to; null = ``<output_dir>/metrics.jsonl``; relative paths are under output_dir."""
    per_example: bool = True
    """Write per-example arrays to ``<stem>.per_example/step_<step>_<id>.npz`` and reference them."""
    samples: bool = True
    """Write per-sample records (a suite's, e.g. lm-eval's) to
    ``<stem>.samples/<suite>/step_<step>_<id>/<task>.jsonl`` and reference them by task."""


class JsonlLogger:
    """Appends one JSON line per result; idempotent on `tracker_eval.identity.delivery_key`."""

    Config = JsonlConfig

    def __init__(self, config: JsonlConfig | None = None, *, context: LoggerContext, name: str = "jsonl") -> None:
        self.config = config or JsonlConfig()
        self.name = name
        path = pathlib.Path(self.config.path or "metrics.jsonl")
        self.path = path if path.is_absolute() else pathlib.Path(context.output_dir) / path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._dirty = False
        self.reconcile({})

    def reconcile(self, in_flight: Mapping[int, float], *, suite: str = "") -> None:
        """Re-reads which results the file holds: another process may have appended (or died
        mid-line) since this one looked. Reading the whole file is cheap, so `in_flight` (and the
        suite it belongs to) is not needed."""
        del in_flight, suite
        self._seen = {record_key(r) for r in read_jsonl(self.path)}
        # A crash mid-write can leave an unterminated last line; start ours on a fresh line.
        self._needs_newline = _ends_without_newline(self.path)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Nothing to do: the config belongs to the ledger and the run directory, not the metrics file."""

    def log_result(self, result: EvalResult) -> None:
        """Appends the result's line (and writes its .npz first); skips a result already there."""
        key = delivery_key(result)
        if key in self._seen:
            return
        record = result.to_json()
        record["per_example"] = self._write_npz(result) if self.config.per_example and result.per_example else None
        if self.config.samples and result.samples:
            record["samples"] = self._write_samples(result)
        line = json.dumps(record, sort_keys=True, allow_nan=False, default=_json_default) + "\n"
        if self._needs_newline:
            line = "\n" + line
        data = line.encode()
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes); check free disk space")
        self._needs_newline = False
        self._dirty = True
        self._seen.add(key)

    def flush(self) -> None:
        """Fsyncs the file, making every written line durable."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        """Fsyncs and closes the file."""
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1

    def _write_npz(self, result: EvalResult) -> str:
        folder = self.path.with_name(self.path.stem + ".per_example")
        tag = hashlib.sha256(result.checkpoint.encode()).hexdigest()[:8]
        label = tracker_suite(result)
        suite = f"{label}_" if label else ""
        target = write_npz(folder / f"step_{int(result.step)}_{suite}{tag}.npz", result.per_example)
        return str(target.relative_to(self.path.parent))


    def _write_samples(self, result: EvalResult) -> dict[str, str]:
        # Files first, each complete before the line that names it; a re-send writes the same names.
        tag = hashlib.sha256(f"{result.suite}\0{result.checkpoint}".encode()).hexdigest()[:8]
        folder = self.path.with_name(self.path.stem + ".samples") / (tracker_suite(result) or "none") / (
            f"step_{int(result.step)}_{tag}")
        folder.mkdir(parents=True, exist_ok=True)
        written, taken = {}, set()
        for task, records in result.samples.items():
            target = folder / sample_file_name(task, taken=taken)
            temp = target.with_name(f".{target.name}.tmp")
            with open(temp, "w", encoding="ascii") as handle:
                handle.write(samples_jsonl(task, records))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
            written[str(task)] = str(target.relative_to(self.path.parent))
        descriptor = os.open(folder, os.O_RDONLY)  # the new names survive a power cut with the line
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        return written


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads every complete record of a metrics file (missing file: empty list).

    Lines that are not terminated or not valid JSON (a crash mid-write) are skipped.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for raw in path.read_bytes().split(b"\n")[:-1]:  # the part after the last newline is incomplete
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record and "checkpoint" in record:
            records.append(record)
    return records


def load_per_example(path: str | os.PathLike[str], record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Loads the per-example arrays a record refers to (empty dict when it has none)."""
    reference = record.get("per_example")
    if not reference:
        return {}
    return read_npz(pathlib.Path(path).parent / reference)


def load_samples(path: str | os.PathLike[str], record: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Loads the per-sample records a record refers to, by task (empty dict when it has none)."""
    folder = pathlib.Path(path).parent
    return {task: [json.loads(line) for line in (folder / file).read_text().splitlines()]
            for task, file in (record.get("samples") or {}).items()}


def _ends_without_newline(path: pathlib.Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) != b"\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
