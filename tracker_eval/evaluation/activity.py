"""Lets background tracker work yield to a running evaluation in the same process.

    with evaluating():          # the evaluator marks its batch loop
        ...
    wait_until_idle(max_wait_s=20)   # a logger thread waits (bounded) before serialising a result
    no_more_evaluations()            # a one-shot command is done evaluating: waiters go at once

On a small machine a tracker's Python work (building a W&B table, encoding requests) competes with
the evaluation loop for the interpreter lock and the cores. Results are queued anyway, so doing
that work between evaluations costs the trackers a little latency and the evaluation nothing.
The wait is bounded, so back-to-back evaluations never starve delivery.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

_condition = threading.Condition()
_running = 0
_started = 0  # evaluations begun so far: tells a waiter whether a new one began while it settled
_last_end = float("-inf")
_done = False  # no evaluation will start again in this process


@contextlib.contextmanager
def evaluating() -> Iterator[None]:
    """Marks an evaluation as running for the duration of the block."""
    global _running, _started, _last_end
    with _condition:
        _running += 1
        _started += 1
    try:
        yield
    finally:
        with _condition:
            _running -= 1
            _last_end = time.monotonic()
            _condition.notify_all()


def no_more_evaluations() -> None:
    """Says that this process will evaluate nothing more (`tracker-eval eval` once it has its
    results): waiting for another evaluation to start would only delay delivery."""
    global _done
    with _condition:
        _done = True
        _condition.notify_all()


def wait_until_idle(*, max_wait_s: float, settle_s: float = 0.3) -> float:
    """Blocks while evaluations run, at most `max_wait_s`; returns the seconds waited.

    Idle means no evaluation for `settle_s`: back-to-back evaluations (a watcher catching up on a
    backlog) leave only instants between them, and tracker work started in such an instant would
    run during the next evaluation anyway.
    """
    start = time.monotonic()
    deadline = start + max(0.0, max_wait_s)
    with _condition:
        while True:
            if not _condition.wait_for(lambda: _running == 0, timeout=max(0.0, deadline - time.monotonic())):
                break
            if _done:
                break
            quiet_for = time.monotonic() - _last_end
            if quiet_for >= settle_s:
                break
            seen = _started
            budget = max(0.0, min(settle_s - quiet_for, deadline - time.monotonic()))
            _condition.wait_for(lambda seen=seen: _started != seen or _done, timeout=budget)
            if _started == seen or time.monotonic() >= deadline:
                break
    return time.monotonic() - start
