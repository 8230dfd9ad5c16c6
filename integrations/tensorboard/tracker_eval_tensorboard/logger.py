"""TensorBoard logger plug-in: event files under ``<logdir>/<run_name>``, one point per checkpoint step.

Registered as ``type: tensorboard`` in the ``tracker_eval.loggers`` entry-point group. Writes with
TensorBoard's own protobufs and summary helpers (``scalar`` as ``simple_value``, ``text_pb``,
``histogram_pb``), which need no TensorFlow. The file layout (`runlog`) keeps every step visible in
TensorBoard's default readers when a lower step arrives late; what a run already holds is read back
from its files, so a step is never written twice, across crashes and restarts.

    logger = TensorboardLogger(TensorboardLogger.Config(run_name="eval"),
                               context=LoggerContext(output_dir="runs/demo", run_key="ckpts@1a2b"), name="tensorboard")
    logger.log_result(result); logger.flush()   # delivered: fsynced in runs/demo/tensorboard/eval/
    logger.set_summary({"best_step": 300, "best_loss": 0.12})
    # tensorboard --logdir runs/demo/tensorboard
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from tracker_eval import EvalResult
from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import metric_key
from tracker_eval.identity import tracker_run_name, tracker_suite
from tracker_eval.loggers.base import LoggerContext

META = "tracker_eval"  # tags of text summaries about the run, apart from the metrics
PROVENANCE_TAG = f"{META}/provenance"
BEST_TAG = f"{META}/best"
HISTOGRAM_BUCKETS = 30  # TensorBoard's own default
STREAM_FILE = ".tracker-eval-stream"  # the run key of the stream that owns the run directory


@dataclasses.dataclass(frozen=True)
class TensorboardConfig:
    """Options of ``type: tensorboard``."""

    logdir: str | None = None
    """Directory to point TensorBoard at; null = ``<output_dir>/tensorboard``; relative paths are under output_dir."""
    run_name: str | None = None
    """Run (sub-directory of logdir), e.g. ``eval`` next to a training run's ``train``; null =
    ``eval-<hash of the stream>`` (the MLflow run's default name), so a changed model, data or
    checkpoint directory starts a new run."""


class TensorboardLogger:
    """Writes each result as one event at its checkpoint step; idempotent on step; durable after `flush`."""

    Config = TensorboardConfig

    def __init__(
        self, config: TensorboardConfig | None = None, *, context: LoggerContext, name: str = "tensorboard"
    ) -> None:
        self.config = config or TensorboardConfig()
        # Import here, on the constructing (main) thread, like the other plug-ins: a first import
        # from a fan-out worker while the main thread imports JAX can fail half-way on Python 3.11.
        from tracker_eval_tensorboard import summaries  # noqa: PLC0415
        from tracker_eval_tensorboard.runlog import RunLog  # noqa: PLC0415

        self._summaries = summaries
        self.name = name
        self.prefix = context.prefix
        self.run_key = context.run_key or str(pathlib.Path(context.output_dir).absolute())
        logdir = pathlib.Path(self.config.logdir or "tensorboard")
        self.logdir = (logdir if logdir.is_absolute() else pathlib.Path(context.output_dir) / logdir).absolute()
        self.run_name = self.config.run_name or default_run_name(self.run_key)
        _check_run_name(self.run_name)
        self.run_dir = self.logdir / self.run_name
        self._log = RunLog(self.run_dir)
        # What the run's files hold, read once and then kept up to date under the run's lock.
        self._held_steps: set[int] = set()
        self._held_tags: set[tuple[int, str]] = set()  # (step, tag): a suite's tags hold its name
        self._held_texts: set[tuple[str, int, str]] = set()
        self._pending: list[_Pending] = []
        self._config: dict[str, Any] = {}
        with self._log.locked() as changes:
            self._check_stream()
            self._take(changes)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Keeps the config for the provenance text written with the run's first result."""
        self._config = dict(config)

    def log_result(self, result: EvalResult) -> None:
        """Buffers one event at ``result.step``: scalars ``<prefix>/<metric>``, histograms
        ``<prefix>/per_example/<name>`` and a text ``<prefix>/alerts/<metric>`` per regression alert
        (``<prefix>/<suite>/...`` for a suite's result); the first
        one the run gets also carries the provenance text.

        A result whose tags the run already holds at that step, or that was logged since the last
        flush, is skipped: two suites of one step have other tags, and both are written.

        Raises:
          ValueError: a negative step (TensorBoard steps of a run are >= 0 here).
        """
        step = int(result.step)
        if step < 0:
            raise ValueError(f"checkpoint step {step} is negative; the tensorboard logger needs steps >= 0")
        key = functools.partial(metric_key, self.prefix, tracker_suite(result))
        values = [self._summaries.scalar(key(n), float(v)) for n, v in result.metrics.items()]
        for n, array in result.per_example.items():
            finite = finite_values(array)
            if finite is not None and finite.size:
                values.append(self._summaries.histogram(key(f"per_example/{n}"), finite, buckets=HISTOGRAM_BUCKETS))
        for alert in result.alerts:  # a text in the step's own event: held, and skipped on a resend, with it
            values.append(self._summaries.text(key(f"alerts/{alert['metric']}"),
                                               alert["message"]))
        if not values:
            return
        tags = frozenset(value.tag for value in values)
        if self._holds(step, tags) or any(p.step == step and p.tags & tags for p in self._pending):
            return
        provenance = None if self._has_provenance() else provenance_markdown(self.run_key, self._config, result)
        event = self._summaries.make_event(step, values, wall_time=result.time)
        self._pending.append(_Pending(event=event, step=step, tags=tags, provenance=provenance))

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Buffers the text ``tracker_eval/best`` at step ``values["best_step"]`` (else the newest
        step); a text the run already holds at that step is not written again."""
        step = values.get("best_step")
        if not isinstance(step, (int, np.integer)):
            step = max([*self._held_steps, *(p.step for p in self._pending if p.step is not None)], default=0)
        text = "\n".join(f"- **{k}**: {_format_value(v)}" for k, v in values.items())
        key = (BEST_TAG, int(step), text)
        if key in self._held_texts or any(p.text == key for p in self._pending):
            return
        event = self._summaries.make_event(int(step), [self._summaries.text(BEST_TAG, text)], wall_time=time.time())
        self._pending.append(_Pending(event=event, text=key))

    def flush(self) -> None:
        """Writes what was logged since the last flush and fsyncs it.

        Under the run's lock, the files are read again first: what another writer (e.g. training's
        in-loop evaluation) added meanwhile is left out of this batch, so each step is held once.
        """
        if not self._pending:
            return
        with self._log.locked() as changes:
            self._take(changes)
            todo, provenance = [], self._has_provenance()
            for item in self._pending:
                if item.step is not None and not self._holds(item.step, item.tags):
                    event = item.event
                    if not provenance and item.provenance is not None:
                        event = _with_value(event, self._summaries.text(PROVENANCE_TAG, item.provenance))
                        provenance = True
                    todo.append(event)
                elif item.text is not None and item.text not in self._held_texts:
                    todo.append(item.event)
            self._log.write(todo)
            for event in todo:
                self._note(event)
        self._pending.clear()

    def close(self) -> None:
        """Flushes; nothing stays open between calls."""
        self.flush()

    @property
    def compactions(self) -> int:
        """New generations this logger wrote because a step arrived late (tests, benchmarks)."""
        return self._log.compactions

    def _holds(self, step: int, tags: frozenset[str]) -> bool:
        return any((step, tag) in self._held_tags for tag in tags)

    def _has_provenance(self) -> bool:
        return any(tag == PROVENANCE_TAG for tag, _, _ in self._held_texts)

    def _take(self, changes: Any) -> None:
        if changes.reset:
            self._held_steps, self._held_tags, self._held_texts = set(), set(), set()
        for event in changes.events:
            self._note(event)

    def _note(self, event: Any) -> None:
        if not _is_meta(event):
            self._held_steps.add(event.step)
            self._held_tags.update((event.step, value.tag) for value in event.summary.value)
        self._held_texts.update(self._summaries.texts_of(event, prefix=f"{META}/"))

    def _check_stream(self) -> None:
        path = self.run_dir / STREAM_FILE
        try:
            owner = path.read_text().strip()
        except FileNotFoundError:
            tmp = path.with_name(f"{STREAM_FILE}.tmp-{os.getpid()}")
            tmp.write_text(self.run_key + "\n")
            os.replace(tmp, path)
            return
        if owner != self.run_key:
            raise ConfigError(
                f"tensorboard run directory {self.run_dir} holds another evaluation stream ({owner}); "
                f"this one is {self.run_key}. Set another run_name, or remove that directory to start the run over"
            )


@dataclasses.dataclass(frozen=True)
class _Pending:
    """An event logged since the last flush: a result's (``step``) or a run summary text (``text``)."""

    event: Any
    step: int | None = None
    tags: frozenset[str] = frozenset()
    text: tuple[str, int, str] | None = None
    provenance: str | None = None


default_run_name = tracker_run_name
"""``eval-<10 hex digits>`` of the run key (`tracker_eval.identity.tracker_run_name`), as MLflow names its run."""


def finite_values(values: Any) -> np.ndarray | None:
    """The finite numbers of a per-example array as float64 (None when it is not numeric)."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        return None
    flat = array.reshape(-1).astype(np.float64)
    return flat[np.isfinite(flat)]


def provenance_markdown(run_key: str, config: Mapping[str, Any], result: EvalResult) -> str:
    """The run's provenance as a Markdown text: stream, first checkpoint, result provenance, config."""
    doc = {"stream": run_key, "first_checkpoint": result.checkpoint, "provenance": dict(result.provenance),
           "config": dict(config)}
    body = json.dumps(doc, indent=2, sort_keys=True, default=str)
    return "```\n" + body + "\n```"  # a code block: TensorBoard renders text summaries as Markdown


def _check_run_name(run_name: str) -> None:
    parts = run_name.split("/")
    if run_name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "tfevents" in run_name:
        raise ConfigError(
            f"tensorboard run_name {run_name!r} must be a relative path without empty, '.' or '..' parts "
            "and without 'tfevents' (TensorBoard takes such a name for an event file); e.g. run_name: eval"
        )


def _format_value(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return str(value)


def _is_meta(event: Any) -> bool:
    return all(value.tag.startswith(f"{META}/") for value in event.summary.value)


def _with_value(event: Any, value: Any) -> Any:
    copy = type(event)()
    copy.CopyFrom(event)
    copy.summary.value.append(value)
    return copy
