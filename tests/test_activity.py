"""Tracker work yields to a running evaluation, for a bounded time, and never delays idle callers."""

from __future__ import annotations

import threading
import time

import pytest

from tracker_eval.evaluation import activity


@pytest.fixture(autouse=True)
def _evaluations_may_still_start(monkeypatch):
    """`no_more_evaluations()` is process-wide and sticky: a `tracker-eval eval` run in-process by
    another test module (the same worker under pytest-xdist) would turn every settle below off."""
    monkeypatch.setattr(activity, "_done", False)


def test_idle_process_does_not_wait():
    assert activity.wait_until_idle(max_wait_s=5.0) < 0.05


def test_waits_for_the_evaluation_and_a_short_settle():
    entered, release = threading.Event(), threading.Event()

    def evaluation():
        with activity.evaluating():
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=evaluation)
    thread.start()
    assert entered.wait(30)
    threading.Timer(0.3, release.set).start()
    waited = activity.wait_until_idle(max_wait_s=10.0, settle_s=0.2)
    thread.join()
    assert 0.45 <= waited < 10.0  # about 0.3 s of evaluation + 0.2 s settle, never the bound


def test_back_to_back_evaluations_are_waited_out_but_only_up_to_the_bound():
    stop, started = threading.Event(), threading.Event()

    def evaluations():
        while not stop.is_set():
            with activity.evaluating():
                started.set()
                time.sleep(0.1)

    thread = threading.Thread(target=evaluations)
    thread.start()
    try:
        assert started.wait(30)
        waited = activity.wait_until_idle(max_wait_s=0.8, settle_s=0.3)
    finally:
        stop.set()
        thread.join()
    assert 0.75 <= waited < 5.0  # evaluations never stop: only the 0.8 s bound ends the wait


def test_a_process_done_evaluating_lets_waiters_go_without_the_settle():
    """`tracker-eval eval` evaluates once: its loggers need not wait to see whether another begins."""
    with activity.evaluating():
        pass
    activity.no_more_evaluations()
    assert activity.wait_until_idle(max_wait_s=60.0, settle_s=30.0) < 10.0  # the settle alone is 30 s
