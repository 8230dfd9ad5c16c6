"""W&B logger plug-in: one row per checkpoint, plotted against ``checkpoint_step``, durable on flush.

Registered as ``type: wandb`` in the ``tracker_eval.loggers`` entry-point group; ``wandb`` is
imported on first use only. Rows carry ``checkpoint_step`` as a value (never ``step=``), so
out-of-order checkpoints are all kept. wandb 0.31 has no public flush: `flush` finishes the run
(everything is then in the ``.wandb`` file) and the next call resumes the same run id, in a new
run directory. The run is open only between a delivery's first call and its flush, so two
processes of one stream (a watcher beside in-training evaluation) never hold it open together:
only the holder of the delivery lease sends.

Which steps the run already holds is read back only where the ledger cannot know it: `reconcile`
(called when this process takes delivery over) reads just the run directories written since the
oldest unacknowledged attempt began, so start-up does not grow with the run's history. Without a
ledger (``tracker-eval eval``) the first `log_result` reads every directory of the run.

    logger = WandbLogger(WandbLogger.Config(project="my-eval", mode="offline"),
                         context=LoggerContext(output_dir="runs/demo", run_key="ckpts@1a2b"), name="wandb")
    logger.log_result(result); logger.flush()   # delivered: on disk in runs/demo/wandb/
    logger.set_summary({"best/loss": 0.12, "best/step": 300})
    logger.run_state()                            # {"run_id": "eval-..."}
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
from tracker_eval.identity import tracker_run_id, tracker_suite
from tracker_eval.loggers.base import LoggerContext
from tracker_eval_wandb import reader

MODES = ("online", "offline")
_RESUME_RETRY_S = 15.0
# File times may be coarser than the ledger's clock (and a little behind it on some file systems).
_MTIME_SLACK_S = 5.0


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Options of ``type: wandb``. The API key is read by wandb from WANDB_API_KEY only."""

    project: str = "tracker-eval"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); null = the key's default."""
    group: str | None = None
    """Run group, e.g. the training run's group so the eval run sits beside it."""
    name: str | None = None
    """Display name of a new eval run; null = W&B's default."""
    tags: tuple[str, ...] = ()
    """Run tags."""
    mode: str | None = None
    """online or offline; null = $WANDB_MODE if set, else online with WANDB_API_KEY, else offline."""
    dir: str | None = None
    """Directory holding ``wandb/``; null = the output directory."""
    run_id: str | None = None
    """Attach to this run (resume="allow"); null = a separate eval run whose id is derived from the
    run key, so restarts attach to the same run. Each delivery finishes the run (that is what makes
    it durable) and the next resumes it, so attach only to a run no other process is writing (a
    finished training run); next to a live training run, share its ``group`` instead."""
    table_max_rows: int = 10000
    """Rows of the per-example table, and of each task's samples table, per checkpoint (the
    histograms always cover every example)."""


class WandbLogger:
    """Logs each result as one W&B row; idempotent on checkpoint step; durable after `flush`."""

    Config = WandbConfig

    def __init__(self, config: WandbConfig | None = None, *, context: LoggerContext, name: str = "wandb") -> None:
        self.config = config or WandbConfig()
        # Import the library here, on the constructing (main) thread: importing it first from a
        # fan-out worker while the main thread imports JAX/Orbax can fail half-way on Python 3.11
        # ("AST constructor recursion depth mismatch") and leave a broken module for the process.
        import wandb  # noqa: F401, PLC0415
        mode = self.config.mode or _default_mode()
        if mode not in MODES:
            raise ConfigError(f"wandb mode {mode!r} is not one of {', '.join(MODES)}; set mode: offline or online")
        self.mode = mode
        self.name = name
        self.prefix = context.prefix
        self.dir = pathlib.Path(self.config.dir or context.output_dir).absolute()
        run_key = context.run_key or str(pathlib.Path(context.output_dir).absolute())
        self.run_id: str = self.config.run_id or context.run_state.get("run_id") or derive_run_id(run_key)
        self._run: Any = None
        self._config: dict[str, Any] = {}
        # suite -> steps on disk; a suite not in it is read in full on first use (no ledger).
        self._held: dict[str, set[int]] = {}
        self._pending: set[tuple[int, str]] = set()  # (step, suite) logged since the last finish
        self._dirty = False
        self.finish_seconds: list[float] = []  # cost of each flush (finish), for benchmarks

    @property
    def wandb_dir(self) -> pathlib.Path:
        """The ``wandb/`` directory holding this run's local files."""
        return self.dir / "wandb"

    def run_state(self) -> dict[str, Any]:
        """State to persist across restarts: ``{"run_id": ...}``."""
        return {"run_id": self.run_id}

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Puts the config under ``tracker_eval`` in the run config when the run is next opened.

        The run is not opened here: only a process delivering under the lease opens it.
        """
        self._config["tracker_eval"] = dict(config)
        if self._run is not None:
            self._run.config.update({"tracker_eval": dict(config)}, allow_val_change=True)
            self._dirty = True
        import wandb

        # The first Table imports pandas (~0.5 s of CPU): pay it here, before evaluations start.
        wandb.Table(columns=["index"], data=[[0]])

    def reconcile(self, in_flight: Mapping[int, float], *, suite: str = "") -> None:
        """Learns which of the `in_flight` steps of `suite` the run holds (another process may have
        sent them and died before acknowledging); every other undelivered step of that suite is
        known not to be there. A suite's rows are those with keys under ``<prefix>/<suite>/``.

        Only the run directories whose ``.wandb`` file was written at or after the oldest of those
        attempts began are read, one inspector call each; with nothing in flight, none.

        Raises:
          RuntimeError: wandb's inspector failed on one of those files.
        """
        held: set[int] = set()
        if in_flight:
            since = min(in_flight.values()) - _MTIME_SLACK_S
            held = reader.held_steps(self.wandb_dir, self.run_id, prefix=metric_key(self.prefix, suite, ""),
                                     modified_since=since)
            held &= set(in_flight)
        if not suite:
            self._held.clear()  # a logger of a config without suites forgets everything, as before
        self._held[suite] = held

    def log_result(self, result: EvalResult) -> None:
        """Logs one row ``{checkpoint_step, <prefix>/<metric>..., per-example table and histograms,
        one samples table per task}``.

        A (checkpoint step, suite) the run already holds (on disk or sent by this logger) is skipped;
        a suite's keys are ``<prefix>/<suite>/<metric>``, so one step's suites are one row each.
        """
        step = int(result.step)
        suite = tracker_suite(result)
        if step in self._held_steps(suite) or (step, suite) in self._pending:
            return
        run = self._ensure_run()
        import wandb

        key = functools.partial(metric_key, self.prefix, suite)
        row: dict[str, Any] = {reader.STEP_KEY: step}
        row.update({key(n): float(v) for n, v in result.metrics.items()})
        columns = {}
        for n, values in result.per_example.items():
            array = np.asarray(values)
            finite = array.reshape(-1).astype(np.float64)
            finite = finite[np.isfinite(finite)]
            if finite.size:
                row[key(f"per_example/{n}")] = wandb.Histogram(finite)
            if array.ndim == 1:
                columns[n] = array
        lengths = {len(v) for v in columns.values()}
        if columns and len(lengths) == 1:
            rows = min(lengths.pop(), self.config.table_max_rows)
            names = sorted(columns)
            cells = zip(*(columns[n][:rows].tolist() for n in names), strict=True)
            data = [[i, *values] for i, values in enumerate(cells)]
            row[key("per_example_table")] = wandb.Table(columns=["index", *names], data=data)
        for task, records in result.samples.items():  # <prefix>/<suite>/samples/<task>
            columns_of_task, data = samples_table(records[: self.config.table_max_rows])
            row[key(f"samples/{task}")] = wandb.Table(columns=columns_of_task, data=data)
        run.config.update({"tracker_eval_provenance": dict(result.provenance),
                           "tracker_eval_checkpoint": result.checkpoint}, allow_val_change=True)
        run.log(row)
        for alert in result.alerts:  # with the row: a resent step is skipped above, alerts with it
            run.alert(title=f"tracker-eval: {metric_key(self.prefix, suite, alert['metric'])} regressed "
                            f"at step {alert['step']}", text=alert["message"], level=wandb.AlertLevel.WARN)
        self._pending.add((step, suite))
        self._dirty = True

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Sets run summary values (e.g. best checkpoint); durable after the next `flush`."""
        run = self._ensure_run()
        run.summary.update(
            {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in values.items()}
        )
        self._dirty = True

    def flush(self) -> None:
        """Finishes the run so everything logged is in the ``.wandb`` file; the next call resumes it."""
        if self._run is None or not self._dirty:
            return
        start = time.perf_counter()
        # The run is let go only once finish returned: if it raises, the steps stay pending in this
        # run (a retry must neither log them twice nor report them written) and the next flush
        # tries to finish again.
        self._run.finish()
        self._run = None
        self.finish_seconds.append(time.perf_counter() - start)
        for step, suite in self._pending:
            self._held_steps(suite).add(step)
        self._pending.clear()
        self._dirty = False

    def close(self) -> None:
        """Flushes (finishes the run)."""
        self.flush()
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()

    def _held_steps(self, suite: str) -> set[int]:
        if suite not in self._held:
            self._held[suite] = reader.held_steps(self.wandb_dir, self.run_id,
                                                  prefix=metric_key(self.prefix, suite, ""))
        return self._held[suite]

    def _ensure_run(self) -> Any:
        if self._run is not None:
            return self._run
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, x_disable_meta=True, save_code=False,
            disable_git=True, x_save_requirements=False,
        )
        kwargs = dict(
            project=self.config.project, entity=self.config.entity, group=self.config.group,
            name=self.config.name, tags=list(self.config.tags) or None, job_type="eval",
            dir=str(self.dir), id=self.run_id, resume="allow", mode=self.mode,
            config=self._config or None, reinit="create_new", settings=settings,
        )
        # wandb-core releases a finished run id shortly after finish() returns; resuming it at once
        # can be refused with "run ID ... is in use". Retry briefly instead of failing the delivery.
        deadline = time.monotonic() + _RESUME_RETRY_S
        delay = 0.05
        while True:
            try:
                run = wandb.init(**kwargs)
                break
            except Exception as e:
                if "is in use" not in str(e) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        step_glob = f"{self.prefix}/*" if self.prefix else "*"
        run.define_metric(reader.STEP_KEY)
        run.define_metric(step_glob, step_metric=reader.STEP_KEY)
        self._run = run
        return run


SAMPLE_COLUMNS = ("doc_id", "filter", "target", "arguments", "resps", "filtered_resps")


def samples_table(records: list[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One task's lm-eval records as table columns and rows.

    Columns: ``doc_id`` (a number), ``filter``, then ``target``, ``arguments``, ``resps`` and
    ``filtered_resps`` as JSON text (their shapes vary by request type), then one column per
    per-sample metric (those named in a record's ``metrics``): numbers where every record has a
    number or nothing, else JSON text. The document itself is left out (the MLflow artifact and the
    ledger keep whole records).
    """
    metrics = list(dict.fromkeys(m for record in records for m in record.get("metrics", ()) if m not in SAMPLE_COLUMNS))
    numeric = {m for m in metrics if all(_is_number(r.get(m)) or r.get(m) is None for r in records)}
    data = []
    for record in records:
        doc_id = record.get("doc_id")
        cells: list[Any] = [doc_id if _is_number(doc_id) else json.dumps(doc_id), str(record.get("filter", ""))]
        cells += [json.dumps(record.get(name)) for name in SAMPLE_COLUMNS[2:]]
        for name in metrics:
            value = record.get(name)
            cells.append((None if value is None else float(value)) if name in numeric else json.dumps(value))
        data.append(cells)
    return [*SAMPLE_COLUMNS, *metrics], data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


derive_run_id = tracker_run_id
"""A deterministic W&B run id for a run key (`tracker_eval.identity.tracker_run_id`)."""


def _default_mode() -> str:
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in MODES:
        return env_mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"
