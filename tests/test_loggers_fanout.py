"""Fan-out isolation with fake loggers: raising, hanging and slow loggers never stop a good one."""

from __future__ import annotations

import threading
import time

import pytest

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.fanout import FanOut, FanOutError, LoggerError


class RecordingLogger:
    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: list[int] = []
        self.flushed = 0
        self.closed = False

    def log_config(self, config):
        pass

    def log_result(self, result):
        self.steps.append(result.step)

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed = True


class RaisingLogger(RecordingLogger):
    def log_result(self, result):
        raise ConnectionError(f"tracker down at step {result.step}")

    def close(self):
        self.closed = True
        raise OSError("close failed")


class HangingLogger(RecordingLogger):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = threading.Event()
        self.calls = 0

    def log_result(self, result):
        self.calls += 1
        self.release.wait(30)
        self.steps.append(result.step)


def _result(step: int) -> EvalResult:
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": step / 10})


def test_submit_returns_at_once_and_good_logger_gets_everything():
    good, bad, hung = RecordingLogger("good"), RaisingLogger("bad"), HangingLogger("hung")
    errors: list[LoggerError] = []
    fanout = FanOut([bad, hung, good], deadline_s=0.5, on_error=errors.append)
    start = time.monotonic()
    for step in (300, 100, 200):
        fanout.submit(_result(step))
    # Waiting on the hung logger would cost its 0.5 s deadline per call (1.5 s in all).
    assert time.monotonic() - start < 1.0
    outcomes = fanout.wait(timeout=2.0)
    assert good.steps == [300, 100, 200]
    assert outcomes["good"] is None
    assert isinstance(outcomes["bad"], LoggerError) and "tracker down at step 300" in str(outcomes["bad"])
    assert outcomes["bad"].logger == "bad" and outcomes["bad"].step == 300
    assert isinstance(outcomes["hung"], LoggerError) and "hung" in str(outcomes["hung"])
    assert "hung" in fanout.busy()
    # While busy, further calls to the hung logger are skipped and reported, not queued.
    fanout.submit(_result(400))
    outcomes = fanout.wait(timeout=1.0)
    assert good.steps[-1] == 400
    assert "busy" in str(outcomes["hung"])
    assert hung.calls == 1
    hung.release.set()
    time.sleep(0.2)
    assert fanout.busy() == {}
    with pytest.raises(FanOutError) as info:
        fanout.close(timeout=2.0)
    assert good.closed and bad.closed and hung.closed
    assert isinstance(info.value.__cause__, LoggerError)
    assert "close failed" in str(info.value)
    assert {e.logger for e in errors} >= {"bad", "hung"}


def test_deliver_reports_per_logger_within_deadline():
    good, bad, hung = RecordingLogger("good"), RaisingLogger("bad"), HangingLogger("hung")
    fanout = FanOut([good, bad, hung], deadline_s=5.0, on_error=lambda e: None)
    start = time.monotonic()
    outcomes = fanout.deliver(_result(7), deadline_s=0.5)
    elapsed = time.monotonic() - start
    assert 0.4 < elapsed < 3.0  # the call's 0.5 s deadline, not the fan-out's 5 s
    assert outcomes["good"] is None and good.steps == [7] and good.flushed == 1
    assert "ConnectionError" in str(outcomes["bad"])
    assert "no answer within 0.5 s" in str(outcomes["hung"])
    # Busy logger is skipped at once on the next delivery.
    start = time.monotonic()
    outcomes = fanout.deliver(_result(8), logger_names=["hung", "good"], deadline_s=3.0)
    assert time.monotonic() - start < 2.0  # waiting on the hung logger would take the 3 s deadline
    assert "busy" in str(outcomes["hung"]) and outcomes["good"] is None
    assert set(outcomes) == {"hung", "good"}
    with pytest.raises(ValueError, match="'nope'"):
        fanout.deliver(_result(9), logger_names=["nope"])
    hung.release.set()
    with pytest.raises(FanOutError):
        fanout.close(timeout=2.0)
    assert good.closed and bad.closed


def test_success_only_after_flush():
    class FailingFlush(RecordingLogger):
        def flush(self):
            raise TimeoutError("not durable yet")

    logger = FailingFlush("ff")
    fanout = FanOut([logger], deadline_s=2.0, on_error=lambda e: None)
    outcomes = fanout.deliver(_result(1))
    assert logger.steps == [1]
    assert isinstance(outcomes["ff"], LoggerError) and "not durable yet" in str(outcomes["ff"])
    fanout.close()


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="'a'"):
        FanOut([RecordingLogger("a"), RecordingLogger("a")])
