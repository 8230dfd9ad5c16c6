"""Tracker work yields to a running evaluation, for a bounded time, and never delays idle callers."""

from __future__ import annotations

import threading
import time

from tracker_eval.evaluation import activity


def test_idle_process_does_not_wait():
    assert activity.wait_until_idle(max_wait_s=5.0) < 0.05


def test_waits_for_the_evaluation_and_a_short_settle():
    release = threading.Event()

    def evaluation():
        with activity.evaluating():
            release.wait(5)

    thread = threading.Thread(target=evaluation)
    thread.start()
    time.sleep(0.05)
    threading.Timer(0.3, release.set).start()
    waited = activity.wait_until_idle(max_wait_s=5.0, settle_s=0.2)
    thread.join()
    assert 0.4 <= waited < 2.0  # 0.3 s of evaluation (less the start delay) + 0.2 s settle


def test_back_to_back_evaluations_are_waited_out_but_only_up_to_the_bound():
    stop = threading.Event()

    def evaluations():
        while not stop.is_set():
            with activity.evaluating():
                time.sleep(0.1)

    thread = threading.Thread(target=evaluations)
    thread.start()
    try:
        time.sleep(0.05)
        waited = activity.wait_until_idle(max_wait_s=0.8, settle_s=0.3)
    finally:
        stop.set()
        thread.join()
    assert 0.75 <= waited < 1.5


def test_a_process_done_evaluating_lets_waiters_go_without_the_settle(monkeypatch):
    """`tracker-eval eval` evaluates once: its loggers need not wait to see whether another begins."""
    monkeypatch.setattr(activity, "_done", False)  # restored after the test: other tests evaluate on
    with activity.evaluating():
        pass
    activity.no_more_evaluations()
    assert activity.wait_until_idle(max_wait_s=60.0, settle_s=30.0) < 10.0  # the settle alone is 30 s
