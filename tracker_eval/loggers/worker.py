"""One logger's calls, in order, on a thread of their own, each bounded by a deadline.

`tracker_eval.loggers.fanout.FanOut` keeps one `Worker` per logger:

    worker = Worker(logger, max_queue=1000)
    task = Task("log_result", lambda: logger.log_result(result), step=result.step, deadline_s=60)
    worker.put(task)          # or the task fails at once: busy (a call ran past its deadline), queue full
    task.future.result(timeout=60)

A worker whose call ran past its deadline is *busy*: further tasks fail at once until that call
returns, so a hung tracker holds one thread, not its callers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tracker_eval.evaluation.activity import wait_until_idle
from tracker_eval.loggers.base import Logger
from tracker_eval.loggers.failures import FailureKind, classify
from tracker_eval.redact import redact_text


class LoggerError(RuntimeError):
    """One logger call that failed, timed out or was skipped.

    Attributes:
      logger: the logger's name.
      operation: ``log_config``, ``log_result``, ``flush``, ``deliver``, ``set_summary``, ``reconcile``
        or ``close``.
      step: the result's step where there is one.
      reason: a one-line reason; credentials a tracker's own message quotes are masked
        (`tracker_eval.redact.redact_text`).
      kind: how delivery treats it (`tracker_eval.loggers.failures.classify` of what the logger
        raised; a call past its deadline or skipped as busy is an outage).
    """

    def __init__(
        self,
        logger: str,
        operation: str,
        reason: str,
        *,
        step: int | None = None,
        kind: FailureKind = FailureKind.TRANSIENT,
    ) -> None:
        where = f" of step {step}" if step is not None else ""
        reason = redact_text(reason)
        super().__init__(f"logger {logger!r}: {operation}{where} failed: {reason}")
        self.logger = logger
        self.operation = operation
        self.step = step
        self.reason = reason
        self.kind = kind


@dataclasses.dataclass
class Task:
    operation: str
    fn: Callable[[], Any]
    step: int | None
    deadline_s: float
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    started: float | None = None


def _lower_thread_priority(increment: int = 10) -> None:
    """Makes this logger thread (and processes it starts, e.g. wandb-core) yield to evaluation.

    Tracker work (serialising tables, a tracker's own service process) otherwise competes with
    the XLA compute threads for the same cores; on Linux a thread has its own nice value, which
    child processes it spawns inherit. Best effort: other platforms keep the default priority.
    """
    try:
        niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


class Worker:
    """A thread that runs one logger's calls in order."""

    def __init__(self, logger: Logger, *, max_queue: int) -> None:
        self.logger = logger
        self.name = str(logger.name)
        self._queue: queue.Queue[Task | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._current: Task | None = None
        self._timed_out: Task | None = None
        self._thread = threading.Thread(target=self._run, name=f"tracker-eval-logger-{self.name}", daemon=True)
        self._thread.start()

    def busy_reason(self, now: float) -> str | None:
        """Why this worker must be skipped now, or None if it may take calls."""
        with self._lock:
            task = self._timed_out or self._current
            if task is None or task.started is None:
                return None
            running = now - task.started
            if self._timed_out is not None or running > task.deadline_s:
                self._timed_out = task
                return f"busy: its {task.operation} has been running {running:.1f} s (deadline {task.deadline_s:g} s)"
        return None

    def mark_timed_out(self, task: Task) -> None:
        """Marks the worker busy because ``task`` did not finish in time; drops it if not started."""
        if task.future.cancel():
            return
        with self._lock:
            if not task.future.done():
                self._timed_out = task

    def put(self, task: Task) -> None:
        reason = self.busy_reason(time.monotonic())
        if reason is not None:
            task.future.set_exception(
                LoggerError(self.name, task.operation, reason, step=task.step, kind=FailureKind.UNAVAILABLE)
            )
            return
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            task.future.set_exception(
                LoggerError(self.name, task.operation, f"queue full ({self._queue.maxsize} calls waiting)",
                            step=task.step, kind=FailureKind.UNAVAILABLE)
            )

    def stop(self) -> None:
        """Asks the thread to end after the calls already queued (non-blocking)."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # a thread that far behind is a daemon; it dies with the process

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        _lower_thread_priority()
        while True:
            task = self._queue.get()
            if task is None:
                return
            if not task.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                task.started = time.monotonic()
                self._current = task
            try:
                # Trackers yield to a running evaluation (bounded well inside the deadline).
                wait_until_idle(max_wait_s=min(20.0, task.deadline_s / 3))
                value = task.fn()
            except BaseException as e:  # a logger must never kill its worker
                task.future.set_exception(
                    LoggerError(self.name, task.operation, f"{type(e).__name__}: {e}", step=task.step, kind=classify(e))
                )
            else:
                task.future.set_result(value)
            finally:
                with self._lock:
                    self._current = None
                    if self._timed_out is task:
                        self._timed_out = None
