"""The loggers of one evaluation stream, opened from the config on process 0.

    session = LoggerSession.open(config)
    failures = session.deliver(result)      # {logger name: error} for those that failed
    session.close()

A logger that cannot even be constructed (tracker unreachable, bad credentials) is reported like
any failing logger and left out; the others and the evaluation go on. Spec mistakes (unknown type,
unknown option) are `ConfigError`s before anything starts.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Mapping
from typing import Any

from tracker_eval.config import EvalConfig, resolve_ledger_url
from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.identity import tracker_run_key
from tracker_eval.loggers.base import Logger, LoggerContext
from tracker_eval.loggers.console import ConsoleLogger
from tracker_eval.loggers.failures import FailureKind
from tracker_eval.loggers.fanout import FanOut, LoggerError
from tracker_eval.loggers.registry import parse_logger_specs

LOG = logging.getLogger(__name__)


def _takes_suite(method: Any) -> bool:
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "suite" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _start_error(name: str, error: Exception) -> LoggerError:
    # The same error type as every other logger failure, so callers report all of them one way;
    # a logger that cannot start never saw the result, so the result is not at fault.
    return LoggerError(name, "start", f"{type(error).__name__}: {error}", kind=FailureKind.UNAVAILABLE)


class LoggerSession:
    """Constructed loggers behind one isolating fan-out, plus construction failures."""

    def __init__(
        self,
        fanout: FanOut,
        *,
        failed: Mapping[str, Exception],
        prefix: str,
        retry: Mapping[str, Any] | None = None,
        config_dict: Mapping[str, Any] | None = None,
    ) -> None:
        self.fanout = fanout
        self.construction_failures = dict(failed)
        self.prefix = prefix
        self._retry = dict(retry or {})  # name -> zero-arg constructor of a logger that failed to start
        self._config_dict = dict(config_dict or {})

    def start_failed(self, name: str) -> Exception | None:
        """Tries again to construct a logger that could not start; None once it runs.

        A tracker library that failed at start-up (a transient import or network error) would
        otherwise keep its results in the outbox until the process restarts.
        """
        if name not in self.construction_failures:
            return None
        try:
            logger = self._retry[name]()
        except Exception as error:  # noqa: BLE001 - still failing: the caller retries with backoff
            self.construction_failures[name] = _start_error(name, error)
            return self.construction_failures[name]
        self.fanout.add(logger)
        self.fanout.log_config(self._config_dict, names=[name])
        del self.construction_failures[name]
        LOG.warning("tracker-eval: logger %r started on a later attempt", name)
        return None

    @classmethod
    def open(
        cls,
        config: EvalConfig,
        *,
        run_state: Mapping[str, Mapping[str, Any]] | None = None,
        only: set[str] | None = None,
    ) -> LoggerSession:
        """Builds every configured logger (or those named in `only`).

        Raises:
          ConfigError: an invalid `loggers:` entry.
        """
        specs = parse_logger_specs(config.loggers)
        loggers: list[Logger] = []
        failed: dict[str, Exception] = {}
        retry: dict[str, Any] = {}
        key = tracker_run_key(config)
        for spec in specs:
            if only is not None and spec.name not in only:
                continue
            context = LoggerContext(
                output_dir=config.output_dir,
                prefix=config.metric_prefix,
                run_key=key,
                run_state=dict((run_state or {}).get(spec.name, {})),
                ledger_url=resolve_ledger_url(config.ledger),
            )
            construct = functools.partial(spec.cls, spec.config, context=context, name=spec.name)
            try:
                loggers.append(construct())
            except ConfigError:
                raise  # a bad option value is the user's to fix now, not a tracker outage to wait out
            except Exception as error:  # noqa: BLE001 - one unreachable tracker must not stop the rest
                failed[spec.name] = _start_error(spec.name, error)
                retry[spec.name] = construct
                LOG.warning("tracker-eval: logger %r could not start: %s", spec.name, error)
        fanout = FanOut(loggers, deadline_s=config.watch.delivery_deadline_s)
        config_dict = config.to_dict()
        session = cls(fanout, failed=failed, prefix=config.metric_prefix, retry=retry, config_dict=config_dict)
        session.fanout.log_config(config_dict)
        return session

    def persist_run_states(self, ledger: Any) -> None:
        """Stores each logger's tracker run (e.g. its MLflow run id) in the ledger.

        Done right after opening, so a watcher or training process started later attaches to the
        same tracker runs instead of creating its own.
        """
        for name, state in self.fanout.run_states().items():
            if state:
                ledger.set_run_state(name, state)

    @property
    def names(self) -> list[str]:
        """Names of the loggers that started."""
        return self.fanout.names

    @property
    def has_console(self) -> bool:
        return any(isinstance(lg, ConsoleLogger) for lg in self.fanout.loggers.values())

    def print_table(self, result: EvalResult) -> None:
        """The console table, for commands that print a result whether or not a console logger is on."""
        ConsoleLogger(context=LoggerContext(output_dir="", prefix=self.prefix)).log_result(result)
        sys.stdout.flush()

    def deliver(self, result: EvalResult, names: list[str] | None = None) -> dict[str, Exception]:
        """Delivers synchronously (log + flush, bounded); returns the failures by logger name."""
        failures = {n: e for n, e in self.construction_failures.items() if names is None or n in names}
        names = [n for n in (names or self.fanout.names) if n in self.fanout.names]
        if names:
            outcomes = self.fanout.deliver(result, names)
            failures.update({n: e for n, e in outcomes.items() if e is not None})
        return failures

    def reconcile(self, name: str, in_flight: Mapping[int, float], *, suite: str = "") -> Exception | None:
        """Has logger `name` learn again what its destination holds (this process just took over
        its delivery); `in_flight` maps each step of `suite` that another process may have sent
        without acknowledging it to the unix time that attempt began. None when done, or the logger
        has no ``reconcile``; else the error.

        A suite's steps go to ``reconcile(in_flight, suite=NAME)``; a logger whose ``reconcile``
        takes no ``suite`` is called as before, with the steps alone.
        """
        method = getattr(self.fanout.loggers.get(name), "reconcile", None)
        if not callable(method):
            return None
        steps = dict(in_flight)
        if suite and _takes_suite(method):
            return self.fanout.call(name, "reconcile", lambda lg: lg.reconcile(steps, suite=suite))
        return self.fanout.call(name, "reconcile", lambda lg: lg.reconcile(steps))

    def summarizes(self, name: str) -> bool:
        """Whether logger `name` runs and keeps a run summary (has ``set_summary``)."""
        return callable(getattr(self.fanout.loggers.get(name), "set_summary", None))

    def set_summary(self, name: str, values: Mapping[str, Any]) -> Exception | None:
        """Sets logger `name`'s run summary and makes it durable (``set_summary`` then ``flush``).

        Returns:
          None when done, else the `LoggerError`.
        """
        summary = dict(values)

        def apply(logger: Any) -> None:
            logger.set_summary(summary)
            logger.flush()

        return self.fanout.call(name, "set_summary", apply)

    def close(self, timeout: float | None = None) -> list[str]:
        """Closes every logger within `timeout`; failures are warnings (results are in the ledger).

        Returns:
          Loggers whose calls were still running when the time was up: a write may still land,
          so their delivery leases must not be handed to another process yet.
        """
        try:
            self.fanout.close(timeout)
        except Exception as error:  # noqa: BLE001
            LOG.warning("tracker-eval: warning: closing loggers: %s", error)
        return list(self.fanout.still_running)
