"""MLflow logger plug-in: metrics at step = checkpoint step, per-example arrays and samples as artifacts.

Registered as ``type: mlflow`` in the ``tracker_eval.loggers`` entry-point group. ``mlflow`` is
imported on first use (2-4 s), never when tracker-eval is imported.

    logger = MlflowLogger(MlflowLogger.Config(tracking_uri="http://127.0.0.1:5000"),
                          context=LoggerContext(output_dir="runs/demo", run_key="ckpts@1a2b"), name="mlflow")
    logger.log_result(result)          # idempotent: steps the run already holds are not re-sent
    logger.set_summary({"best_step": 300, "best/loss": 0.12})
    logger.run_state()                 # {"run_id": "...", "experiment_id": "..."}
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tracker_eval import EvalResult
from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import metric_key
from tracker_eval.identity import tracker_suite
from tracker_eval.loggers.base import LoggerContext
from tracker_eval.loggers.failures import FailureKind, mark
from tracker_eval_mlflow.artifacts import log_step_artifacts
from tracker_eval_mlflow.failures import NonFiniteMetricError, classified
from tracker_eval_mlflow.run import find_or_create_run, run_lock

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

NAN_POLICIES = ("skip", "error", "log")
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
_INVALID_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")

@dataclasses.dataclass(frozen=True)
class MlflowConfig:
    """Options of ``type: mlflow``."""

    tracking_uri: str | None = None
    """http(s):// server or sqlite:/// store; null = ``sqlite:///<output_dir>/mlflow.db`` (no server)."""
    experiment: str = "tracker-eval"
    """Experiment of the eval run (created if missing); ignored when run_id is given."""
    run_name: str | None = None
    """Display name of a newly created eval run; null = ``eval-<run key>``."""
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Extra tags set on the run."""
    run_id: str | None = None
    """Attach to this existing run (e.g. the training run) instead of finding or creating one."""
    nan_policy: str = "skip"
    """Non-finite metric values: skip (drop the point, warn), error (fail the delivery), log (send as is)."""
    timeout_s: float = 10.0
    """HTTP timeout per request (sets MLFLOW_HTTP_REQUEST_TIMEOUT for this process)."""
    max_retries: int = 2
    """HTTP retries per request (sets MLFLOW_HTTP_REQUEST_MAX_RETRIES; backoff factor 1)."""


class MlflowLogger:
    """Sends results to one MLflow run, found or created per run key, or given by ``run_id``."""

    Config = MlflowConfig

    def __init__(self, config: MlflowConfig | None = None, *, context: LoggerContext, name: str = "mlflow") -> None:
        self.config = config or MlflowConfig()
        # Import the library here, on the constructing (main) thread: importing it first from a
        # fan-out worker while the main thread imports JAX/Orbax can fail half-way on Python 3.11
        # ("AST constructor recursion depth mismatch") and leave a broken module for the process.
        import mlflow.tracking  # noqa: F401, PLC0415
        if self.config.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"mlflow nan_policy {self.config.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")
        if self.config.timeout_s <= 0 or self.config.max_retries < 0:
            raise ConfigError(
                "mlflow timeout_s must be > 0 and max_retries >= 0, "
                f"got {self.config.timeout_s}, {self.config.max_retries}"
            )
        self.name = name
        self.context = context
        self.prefix = context.prefix
        self.tracking_uri = self.config.tracking_uri or f"sqlite:///{os.path.abspath(context.output_dir)}/mlflow.db"
        self.run_key = context.run_key or os.path.abspath(context.output_dir)
        self._run_id: str | None = self.config.run_id or context.run_state.get("run_id")
        self._experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self._held: dict[str, set[int]] | None = None  # metric key -> steps the run holds
        self._known: set[str] = set()  # keys with any history in the run
        self._lock = threading.Lock()
        # Bounded HTTP: a dead server must cost seconds, not the ~4 minutes of mlflow's defaults.
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(math.ceil(self.config.timeout_s)))
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.config.max_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        if self.tracking_uri.startswith("sqlite:///"):
            # An embedded store has no server to wait for: create and migrate it and find the run
            # now, at start-up, so that this one-time work (seconds; minutes on a loaded machine)
            # never counts against a delivery deadline, and the run id is known to the ledger at once.
            self._ensure_run()

    def run_state(self) -> dict[str, Any]:
        """State to persist across restarts: ``{"run_id": ..., "experiment_id": ...}`` (None before first use)."""
        return {"run_id": self._run_id, "experiment_id": self._experiment_id}

    @property
    def run_id(self) -> str:
        """The run's id (finds or creates the run on first use)."""
        self._ensure_run()
        assert self._run_id is not None
        return self._run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Logs the flattened config as params; keys already set (params are immutable) are left alone."""
        client, run_id = self._ensure_run()
        from mlflow.entities import Param

        existing = client.get_run(run_id).data.params
        params = {}
        for key, value in _flatten(config).items():
            key = sanitize_key(key)
            text = str(value)[:MAX_PARAM_VALUE_LENGTH]
            if key not in existing:
                params[key] = text
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH], synchronous=True)

    def log_result(self, result: EvalResult) -> None:
        """Logs the result's metrics at ``step=result.step``, skipping (key, step) pairs the run holds.

        Raises:
          NonFiniteMetricError: a non-finite metric under ``nan_policy: error`` (a ValueError and a
            `PermanentDeliveryError`: the result is undeliverable at once).
          mlflow.exceptions.MlflowException: the server refused the request or could not be reached
            in time; marked permanent (HTTP 4xx) or unavailable for delivery (`failures.classified`).
        """
        with classified():
            self._log_result(result)

    def reconcile(self, in_flight: Mapping[int, float], *, suite: str = "") -> None:
        """Forgets which (key, step) pairs the run holds; they are read again, per key, on the next
        send (one request per metric key, whatever the history's length). A suite's keys hold its
        name, so one read-back serves every suite."""
        del in_flight, suite
        self._held = None

    def _log_result(self, result: EvalResult) -> None:
        client, run_id = self._ensure_run()
        from mlflow.entities import Metric

        step = int(result.step)
        timestamp = int(result.time * 1000)
        values = self._metric_values(result)
        suite = tracker_suite(result)
        for name, array in result.per_example.items():
            for stat, number in per_example_summary(array).items():
                values[sanitize_key(metric_key(self.prefix, suite, f"per_example/{name}/{stat}"))] = number
        alerts = {sanitize_key(metric_key(self.prefix, suite, f"alerts/{a['metric']}")): a for a in result.alerts}
        values.update({key: float(alert["diff"]) for key, alert in alerts.items()})  # the regression, B - A
        held = self._held_steps(client, run_id, list(values))
        todo = {k: v for k, v in values.items() if step not in held.get(k, set())}
        if not todo:
            return
        if result.per_example or result.provenance or result.samples:
            # Before the metrics: a step whose metrics the run holds has its artifacts too.
            log_step_artifacts(client, run_id, result)
        if alerts:
            # Tags before the `alerts/<metric>` values, like the artifacts; setting a tag again is harmless.
            from mlflow.entities import RunTag

            client.log_batch(run_id, tags=[RunTag(sanitize_key(f"tracker_eval.alert.{key}.step_{step}"),
                                                  alert["message"][:MAX_PARAM_VALUE_LENGTH])
                                           for key, alert in alerts.items()], synchronous=True)
        metrics = [Metric(key, value, timestamp, step) for key, value in todo.items()]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            chunk = metrics[start : start + MAX_METRICS_PER_BATCH]
            client.log_batch(run_id, metrics=chunk, synchronous=True)
            for metric in chunk:
                held.setdefault(metric.key, set()).add(step)

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Sets ``tracker_eval.summary.<key>`` tags (e.g. best checkpoint step and metric)."""
        client, run_id = self._ensure_run()
        from mlflow.entities import RunTag

        tags = [
            RunTag(sanitize_key(f"tracker_eval.summary.{k}"), str(v)[:MAX_PARAM_VALUE_LENGTH])
            for k, v in values.items()
        ]
        if tags:
            client.log_batch(run_id, tags=tags, synchronous=True)

    def flush(self) -> None:
        """Nothing buffered: every call above returns only after the server stored the data."""

    def close(self) -> None:
        """Marks a run this logger created as finished (an attached training run is left alone)."""
        if self._client is not None and self._run_id is not None and self.config.run_id is None:
            self._client.set_terminated(self._run_id, status="FINISHED")

    def _metric_values(self, result: EvalResult) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, value in result.metrics.items():
            number = float(value)
            if not math.isfinite(number):
                if self.config.nan_policy == "error":
                    raise NonFiniteMetricError(
                        f"metric {name!r} at step {result.step} is {number}; set nan_policy: skip or log to accept it"
                    )
                if self.config.nan_policy == "skip":
                    continue
            key = sanitize_key(metric_key(self.prefix, tracker_suite(result), name))
            if key in values:  # the same result would clash every time: undeliverable at once
                raise mark(ValueError(f"metric names {name!r} and another map to the same MLflow key {key!r}; "
                                      "rename one"), FailureKind.PERMANENT)
            values[key] = number
        return values

    def _held_steps(self, client: MlflowClient, run_id: str, keys: list[str]) -> dict[str, set[int]]:
        # Re-sending a step appends a duplicate point in MLflow; learn once per key what the run holds.
        if self._held is None:
            self._held = {}
            self._known = set(client.get_run(run_id).data.metrics)
        for key in keys:
            if key not in self._held:
                history = client.get_metric_history(run_id, key) if key in self._known else []
                self._held[key] = {int(m.step) for m in history}
        return self._held

    def _ensure_run(self) -> tuple[MlflowClient, str]:
        with self._lock:
            if self._client is not None and self._run_id is not None and self._experiment_id is not None:
                return self._client, self._run_id
            # Constructing the client already opens (and creates) an embedded store.
            with run_lock(self.tracking_uri, run_key=self.run_key, ledger_url=self.context.ledger_url,
                          output_dir=self.context.output_dir):
                if self._client is None:
                    from mlflow.tracking import MlflowClient

                    self._client = MlflowClient(tracking_uri=self.tracking_uri)
                client = self._client
                if self._run_id is not None and self._experiment_id is None:
                    self._experiment_id = client.get_run(self._run_id).info.experiment_id
                if self._run_id is None:
                    self._run_id, self._experiment_id = find_or_create_run(
                        client, experiment=self.config.experiment, run_key=self.run_key,
                        run_name=self.config.run_name, tags=self.config.tags, tracking_uri=self.tracking_uri)
            return client, self._run_id

def per_example_summary(values: Any) -> dict[str, float]:
    """Count, mean, min, 5th/50th/95th percentile and max of a per-example array's finite values.

    MLflow has no histogram; these land as metrics at the checkpoint step, next to the arrays'
    artifact. An array that is not numeric gives nothing; one without finite values gives count 0.
    """
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        return {}
    flat = array.reshape(-1).astype(np.float64)
    finite = flat[np.isfinite(flat)]
    if not finite.size:
        return {"count": 0.0}
    p05, p50, p95 = np.quantile(finite, [0.05, 0.5, 0.95])
    return {"count": float(finite.size), "mean": float(finite.mean()), "min": float(finite.min()),
            "p05": float(p05), "p50": float(p50), "p95": float(p95), "max": float(finite.max())}


def sanitize_key(key: str) -> str:
    """An MLflow-valid metric/param/tag key: invalid characters become ``_``, at most 250 characters."""
    key = _INVALID_KEY_CHARS.sub("_", key).replace("..", "_.").lstrip("/")
    return key[:MAX_KEY_LENGTH] or "_"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat

