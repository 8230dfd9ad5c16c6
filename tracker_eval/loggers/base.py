"""The logger protocol: the seam between the evaluation core and every tracker.

A logger receives the run's config once, then one `EvalResult` per evaluated checkpoint. The core
never imports a tracker library; trackers implement this protocol (built-ins here, W&B and MLflow
as plug-ins under ``integrations/``).

    class PrintLogger:
        name = "print"
        def log_config(self, config): ...
        def log_result(self, result): print(result.step, dict(result.metrics))
        def flush(self): ...
        def close(self): ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from tracker_eval.evaluation.result import EvalResult


@runtime_checkable
class Logger(Protocol):
    """A destination for evaluation results.

    Contract:
      * ``log_result`` may buffer; a result counts as delivered only after a following
        ``flush`` returned without error (the outbox marks it delivered then, not before).
      * ``log_result`` for a step the destination already holds must not add a second point:
        a crash between delivery and the ledger's acknowledgement makes re-sends possible.
      * ``close`` releases resources and implies ``flush``; it is called exactly once.
      * Optional ``reconcile(in_flight, *, suite="")``: called (on the logger's thread) whenever
        this process takes over delivery to the logger from another one, once per suite. Forget
        cached knowledge of what the destination holds for that suite; ``in_flight`` maps each of
        its steps whose earlier attempt may have reached the destination without being
        acknowledged to the unix time that attempt began. Every other undelivered step is known,
        from the ledger, never to have been sent, so a logger whose full read-back is expensive
        checks only these. A ``reconcile`` without ``suite`` gets the steps alone.
      * Suites: one logger instance gets every suite's results; ``result.suite`` names it. Keys
        are ``<prefix>/<tracker suite>/<metric>`` (`tracker_eval.evaluation.result.metric_key` of
        `tracker_eval.identity.tracker_suite`: ``val``, or ``val-v2`` once the suite's options
        changed), and "already holds" means `tracker_eval.identity.delivery_key`: the step and
        that tracker suite. ``reconcile``'s ``suite`` is a tracker suite too.
      * Failures: raise `tracker_eval.loggers.failures.PermanentDeliveryError` (or chain from it)
        when the destination will never take this result, `TrackerUnavailableError` when it cannot
        be reached; anything else is retried and counts toward ``watch.max_delivery_attempts``.
      * Optional ``set_summary(values)`` (best checkpoint) and ``run_state()`` (see README).
    """

    name: str

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Records the (secret-free) eval config and provenance once per run."""

    def log_result(self, result: EvalResult) -> None:
        """Sends one evaluation result."""

    def flush(self) -> None:
        """Blocks until everything sent so far is durable at the destination."""

    def close(self) -> None:
        """Flushes and releases the destination."""


@dataclasses.dataclass(frozen=True)
class LoggerContext:
    """What a logger factory may use besides its own options.

    Attributes:
      output_dir: tracker-eval's own output directory (default home of local files).
      prefix: metric key prefix in trackers (``eval`` -> ``eval/loss``).
      run_key: stable identity of this evaluation stream (checkpoint directory + config hash);
        loggers derive deterministic run names/ids from it so restarts attach to the same run.
      run_state: tracker state remembered across restarts (e.g. ``{"run_id": "abc"}``), loaded
        from the ledger; a logger returns its updated state from ``run_state()`` if it has one.
      is_primary: False on processes other than 0; loggers are only created where True.
      ledger_url: the run's PostgreSQL ledger, or None for the SQLite file in `output_dir`: where a
        logger takes a lock that every process of the run shares
        (`tracker_eval.ledger.mutex.run_mutex`), such as the one that creates a tracker run once.
    """

    output_dir: str
    prefix: str = "eval"
    run_key: str = ""
    run_state: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    is_primary: bool = True
    ledger_url: str | None = None
