"""The watcher's poller: a failing storage is logged once, asked again with a doubling backoff, and its
recovery is logged once (a scripted lister and clock; the real storage is in test_gcs_watcher.py)."""

from __future__ import annotations

import logging

import pytest

from tracker_eval.checkpoints.roots import StepNames
from tracker_eval.checkpoints.tree import StorageUnavailableError
from tracker_eval.runners import polling


class ScriptedLister:
    location = "gs://bucket/run"
    step_names = StepNames()
    notice = None

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers
        self.calls = 0

    def finalized_steps(self) -> list[int]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return list(answer)  # type: ignore[call-overload]

    def close(self) -> None:
        pass


def test_failing_polls_back_off_and_are_logged_once(monkeypatch, caplog):
    down = StorageUnavailableError("cannot list gs://bucket/run: ConnectionError")
    lister = ScriptedLister([[10], down, down, down, down, [10, 20]])
    monkeypatch.setattr(polling, "open_lister", lambda _, **__: lister)
    now = [0.0]
    poller = polling.StepPoller("gs://bucket/run", poll_interval_s=1.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="tracker_eval")

    assert poller.poll() == [10] and not poller.failing
    asked_at = []
    for t in [x * 0.5 for x in range(0, 33)]:  # polls every 0.5 s for 16 s of outage
        now[0] = 1.0 + t
        calls = lister.calls
        result = poller.poll()
        if lister.calls > calls:
            asked_at.append(t)
        if result is not None:
            break
    # Asked at once, then after 1, 2, 4 and 8 s: the backoff doubles from the poll interval.
    assert asked_at == [0.0, 1.0, 3.0, 7.0, 15.0]
    assert result == [10, 20] and not poller.failing
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not answering" in m for m in messages) == 1, messages
    assert sum("answers again after 15 s" in m for m in messages) == 1, messages


def test_backoff_is_capped_and_a_restore_failure_backs_off_too(monkeypatch):
    down = StorageUnavailableError("HTTP 503")
    lister = ScriptedLister([down])
    monkeypatch.setattr(polling, "open_lister", lambda _, **__: lister)
    now = [0.0]
    poller = polling.StepPoller("gs://bucket/run", poll_interval_s=20.0, clock=lambda: now[0])
    poller.failed_elsewhere(down)  # a restore found the storage unreachable
    assert poller.failing and poller.poll() is None and lister.calls == 0
    for _ in range(6):
        now[0] += polling.MAX_BACKOFF_S
        assert poller.poll() is None
    assert lister.calls == 6
    now[0] += polling.MAX_BACKOFF_S - 1
    assert poller.poll() is None and lister.calls == 6, "the backoff grows past its cap"


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("x")])
def test_other_errors_are_not_taken_for_an_outage(monkeypatch, error):
    monkeypatch.setattr(polling, "open_lister", lambda _, **__: ScriptedLister([error]))
    poller = polling.StepPoller("gs://bucket/run", poll_interval_s=1.0)
    with pytest.raises(type(error)):
        poller.poll()
