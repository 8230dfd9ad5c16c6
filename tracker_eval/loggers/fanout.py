"""Fan-out of evaluation results to several loggers, each isolated on its own worker thread.

One worker per logger keeps that logger's order; every call is bounded by a deadline; a raising or
hanging logger never blocks the others or the caller. Two uses:

    fanout = FanOut(loggers, deadline_s=60)
    fanout.submit(result)              # returns at once: evaluation never waits on trackers
    outcomes = fanout.wait(timeout=30)   # {name: None | LoggerError}
    # or, for the outbox: log_result + flush per logger, success only after flush succeeded
    outcomes = fanout.deliver(result, logger_names=["mlflow"], deadline_s=60)
    fanout.call("wandb", "set_summary", lambda lg: lg.set_summary(values))   # one call, in order
    fanout.close()                     # closes every logger, then raises the first error

A logger whose call ran past its deadline is *busy*: further calls to it are skipped and reported
as failed until its worker returns, so a hung tracker costs one thread, not the evaluation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import Logger
from tracker_eval.loggers.failures import FailureKind
from tracker_eval.loggers.worker import LoggerError, Task, Worker

__all__ = ["FanOut", "FanOutError", "LoggerError"]

_log = logging.getLogger(__name__)


class FanOutError(RuntimeError):
    """Raised by `FanOut.close` after every logger was closed, when at least one failed.

    Attributes:
      failures: every failure by logger name; the first one is also the ``__cause__``.
    """

    def __init__(self, failures: Mapping[str, Exception]) -> None:
        listed = "; ".join(str(e) for e in failures.values())
        super().__init__(f"{len(failures)} logger(s) failed to close: {listed}")
        self.failures = dict(failures)


class FanOut:
    """Sends results to several loggers concurrently, one ordered worker per logger.

    Args:
      loggers: loggers with unique ``name`` attributes.
      deadline_s: default bound on each logger call (and on ``deliver``).
      max_queue: calls that may wait per logger before further submits are reported as failed.
      on_error: called (on the caller's thread, inside ``wait``/``flush``/``deliver``) with each
        failure; by default failures are logged as warnings.

    Raises:
      ValueError: two loggers share a name.
    """

    def __init__(
        self,
        loggers: Sequence[Logger],
        *,
        deadline_s: float = 60.0,
        max_queue: int = 1000,
        on_error: Callable[[LoggerError], None] | None = None,
    ) -> None:
        names = [str(logger.name) for logger in loggers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"logger names must be unique, got {duplicates} more than once; set 'id:' in the spec")
        self.deadline_s = float(deadline_s)
        self._max_queue = max_queue
        self._workers = {w.name: w for w in (Worker(logger, max_queue=max_queue) for logger in loggers)}
        self._pending: dict[str, collections.deque[Task]] = {name: collections.deque() for name in self._workers}
        self._pending_lock = threading.Lock()
        self._on_error = on_error or (lambda e: _log.warning("%s", e))
        self._closed = False
        self.still_running: list[str] = []  # after `close`: loggers whose worker had not finished

    def add(self, logger: Logger) -> None:
        """Adds a logger that started late (after a failed first construction)."""
        self._check_open()
        name = str(logger.name)
        if name in self._workers:
            raise ValueError(f"a logger named {name!r} is already here")
        with self._pending_lock:
            self._pending[name] = collections.deque()
        # A new dict, not an insertion: other threads may be iterating over the current one.
        self._workers = {**self._workers, name: Worker(logger, max_queue=self._max_queue)}

    @property
    def names(self) -> list[str]:
        """Logger names in construction order."""
        return list(self._workers)

    @property
    def loggers(self) -> dict[str, Logger]:
        """Loggers by name."""
        return {name: w.logger for name, w in self._workers.items()}

    def busy(self) -> dict[str, str]:
        """Loggers currently skipped because a call ran past its deadline, with the reason."""
        now = time.monotonic()
        return {n: r for n, w in self._workers.items() if (r := w.busy_reason(now)) is not None}

    def log_config(self, config: Mapping[str, Any], *, names: Iterable[str] | None = None) -> None:
        """Queues ``log_config`` on every logger, or those in `names` (returns at once; outcomes come
        with ``wait``)."""
        for name in self._workers if names is None else names:
            worker = self._workers[name]
            self._enqueue(worker, "log_config", lambda lg=worker.logger: lg.log_config(config), step=None)

    def submit(self, result: EvalResult, *, flush: bool = False) -> None:
        """Queues ``log_result`` (and with `flush`, a ``flush`` after it) on every logger; returns at once.

        `flush=True` is what a watcher's delivery does per result: each tracker makes the result
        durable (W&B finishes its run) before the next one, so no tracker keeps a session busy
        in the background while the next evaluation runs.
        """
        self._check_open()
        for worker in self._workers.values():
            self._enqueue(worker, "log_result", lambda lg=worker.logger: lg.log_result(result), step=result.step)
            if flush:
                self._enqueue(worker, "flush", worker.logger.flush, step=result.step)

    def call(
        self, name: str, operation: str, fn: Callable[[Logger], Any], *, deadline_s: float | None = None
    ) -> Exception | None:
        """Runs ``fn(logger)`` on that logger's worker, after the calls queued there, and waits for it.

        How delivery runs what must happen under its lease (``set_summary``, ``reconcile``) without
        racing the logger's other calls.

        Args:
          name: the logger.
          operation: what to call it in errors (e.g. ``set_summary``).
          fn: the call.
          deadline_s: bound on the call (default the fan-out's ``deadline_s``).

        Returns:
          None when it returned, else the `LoggerError` (a call past its deadline marks the logger busy).
        """
        self._check_open()
        worker = self._workers[name]
        deadline = self.deadline_s if deadline_s is None else float(deadline_s)
        task = Task(operation, lambda: fn(worker.logger), None, deadline)
        worker.put(task)
        return self._collect({name: [task]}, timeout=deadline, report=False)[name]

    def wait(self, timeout: float | None = None) -> dict[str, Exception | None]:
        """Waits for every queued call and reports each logger's first failure since the last wait.

        Args:
          timeout: overall seconds to wait; None waits for each call's own deadline at most.

        Returns:
          ``{name: None}`` when all its calls succeeded, else the first `LoggerError` (a call
          still running when the time is up counts as a timeout and marks the logger busy).
        """
        with self._pending_lock:
            pending = {name: list(tasks) for name, tasks in self._pending.items()}
            for tasks in self._pending.values():
                tasks.clear()
        return self._collect(pending, timeout=timeout)

    def flush(self, timeout: float | None = None) -> dict[str, Exception | None]:
        """Queues ``flush`` on every logger after what is queued, then waits like `wait`."""
        for worker in self._workers.values():
            self._enqueue(worker, "flush", worker.logger.flush, step=None)
        return self.wait(timeout)

    def deliver(
        self,
        result: EvalResult,
        logger_names: Iterable[str] | None = None,
        *,
        deadline_s: float | None = None,
    ) -> dict[str, Exception | None]:
        """Sends one result synchronously: ``log_result`` then ``flush`` on each logger, concurrently.

        Args:
          result: the result to deliver.
          logger_names: the loggers to deliver to (default all); unknown names are an error.
          deadline_s: overall bound for this call (default the fan-out's ``deadline_s``).

        Returns:
          ``{name: None}`` for each logger whose flush succeeded, else the `LoggerError`. Failures
          are returned, not also passed to ``on_error``: the caller reports each one once.

        Raises:
          ValueError: a name that is not one of this fan-out's loggers.
        """
        self._check_open()
        names = list(self._workers) if logger_names is None else list(logger_names)
        unknown = [n for n in names if n not in self._workers]
        if unknown:
            raise ValueError(f"unknown logger name(s) {unknown}; loggers here: {', '.join(self._workers)}")
        deadline = self.deadline_s if deadline_s is None else float(deadline_s)

        def log_and_flush(logger: Logger) -> None:
            logger.log_result(result)
            logger.flush()

        tasks = {}
        for name in names:
            task = Task("deliver", lambda lg=self._workers[name].logger: log_and_flush(lg), result.step, deadline)
            self._workers[name].put(task)
            tasks[name] = [task]
        return self._collect(tasks, timeout=deadline, report=False)

    def run_states(self) -> dict[str, dict[str, Any]]:
        """Tracker state to persist (e.g. ``{"wandb": {"run_id": ...}}``) from loggers that have it."""
        states = {}
        for name, worker in self._workers.items():
            method = getattr(worker.logger, "run_state", None)
            if callable(method):
                try:
                    states[name] = dict(method())
                except Exception as e:  # state is advisory; a broken logger must not stop the caller
                    self._on_error(LoggerError(name, "run_state", f"{type(e).__name__}: {e}"))
        return states

    def close(self, timeout: float | None = None) -> None:
        """Flushes and closes every logger (busy ones are skipped), then raises the first failure.

        Args:
          timeout: overall seconds for all closes (default the fan-out's ``deadline_s``).

        Raises:
          FanOutError: listing every logger whose close (or an earlier uncollected call) failed.
        """
        if self._closed:
            return
        close_tasks = {}
        for name, worker in self._workers.items():
            task = self._enqueue(worker, "close", worker.logger.close, step=None)
            close_tasks[name] = task
            worker.stop()
        self._closed = True
        outcomes = self.wait(self.deadline_s if timeout is None else timeout)
        self.still_running = [name for name, worker in self._workers.items() if not worker.join(0.5)]
        failures = {name: e for name, e in outcomes.items() if e is not None}
        if failures:
            raise FanOutError(failures) from next(iter(failures.values()))

    def _enqueue(self, worker: Worker, operation: str, fn: Callable[[], Any], *, step: int | None) -> Task:
        task = Task(operation, fn, step, self.deadline_s)
        with self._pending_lock:
            self._pending[worker.name].append(task)
        worker.put(task)
        return task

    def _collect(
        self, tasks: Mapping[str, list[Task]], *, timeout: float | None, report: bool = True
    ) -> dict[str, Exception | None]:
        start = time.monotonic()
        outcomes: dict[str, Exception | None] = {}
        for name, name_tasks in tasks.items():
            worker = self._workers[name]
            outcomes[name] = None
            for task in name_tasks:
                budget = task.deadline_s if timeout is None else timeout
                remaining = max(0.0, start + budget - time.monotonic())
                try:
                    task.future.result(timeout=remaining)
                except concurrent.futures.TimeoutError:
                    worker.mark_timed_out(task)
                    why = f"no answer within {budget:g} s"
                    error: Exception = LoggerError(name, task.operation, why, step=task.step,
                                                   kind=FailureKind.UNAVAILABLE)
                except concurrent.futures.CancelledError:
                    error = LoggerError(name, task.operation, "cancelled before it started", step=task.step,
                                        kind=FailureKind.UNAVAILABLE)
                except LoggerError as e:
                    error = e
                else:
                    continue
                if report:
                    self._on_error(error)
                if outcomes[name] is None:
                    outcomes[name] = error
        return outcomes

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this FanOut is closed; build a new one (registry.build_loggers + FanOut)")
