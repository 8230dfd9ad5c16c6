"""The outbox on a real SQLite file and a real PostgreSQL database (`ledger_backends`): undeliverable
results, re-queuing, in-flight marks, leases, summary marks; and the in-place migration of a
version-1 SQLite ledger."""

from __future__ import annotations

import functools
import math
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.files import encode_result
from tracker_eval.ledger.lease import LeaseClaim
from tracker_eval.ledger.schema import _MIGRATIONS, SCHEMA_VERSION
from tracker_eval.ledger.steps import LeaseLostError, Ledger, StepState

pytest_plugins = ["fixtures_postgres", "ledger_backends"]


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_ledger(out: Path, **kwargs: object) -> Ledger:
    options: dict[str, object] = {"checkpoint_dir": "/ckpt", "config_hash": "cfg", "loggers": ("a", "b")}
    options.update(kwargs)
    return Ledger(out, **options)  # type: ignore[arg-type]


MakeLedger = Callable[..., Ledger]


@pytest.fixture
def make_ledger(ledger_url: str | None) -> MakeLedger:
    """`new_ledger` on each backend in turn: the SQLite file in `out`, then a PostgreSQL database."""
    return functools.partial(new_ledger, url=ledger_url)


def result_of(step: int) -> EvalResult:
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": float(step)},
                      per_example={"file": np.arange(3) + step})


def evaluate(ledger: Ledger, *steps: int) -> None:
    for step in steps:
        assert ledger.claim(step, owner="w")
        assert ledger.record_metrics(result_of(step), owner="w")


def test_a_refused_result_is_undeliverable_at_once_and_later_steps_go_on(
        tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    evaluate(ledger, 1, 2, 3)
    assert ledger.claim_logger("a", owner="d")
    delay = ledger.mark_delivery_failed(1, "a", "HTTP 400: bad value", owner="d", permanent=True)
    assert math.isinf(delay)
    assert [step for step, _ in ledger.pending_deliveries("a")] == [2, 3]  # step 1 no longer holds them
    assert ledger.due_deliveries("a") == [2, 3] and ledger.next_delivery_at("a") is not None
    for step in (2, 3):
        ledger.mark_delivered(step, "a", owner="d")
    assert ledger.claim_logger("b", owner="d")
    for step in (1, 2, 3):
        ledger.mark_delivered(step, "b", owner="d")
    rows = {row["step"]: row for row in ledger.rows()}
    # Stored but not everywhere: the step stays evaluated, and says where and why.
    assert rows[1]["state"] is StepState.EVALUATED
    assert rows[1]["deliveries"] == {"a": "undeliverable", "b": "delivered"}
    assert rows[1]["delivery_errors"] == {"a": "refused: HTTP 400: bad value"}
    assert [rows[s]["state"] for s in (2, 3)] == [StepState.DELIVERED, StepState.DELIVERED]
    assert ledger.next_delivery_at("a") is None


def test_counted_failures_give_up_after_max_delivery_attempts_and_outages_never_count(
        tmp_path: Path, make_ledger: MakeLedger) -> None:
    clock = FakeClock()
    ledger = make_ledger(tmp_path, max_delivery_attempts=3, backoff_base_s=1.0, backoff_cap_s=4.0, clock=clock)
    evaluate(ledger, 1, 2)
    assert ledger.claim_logger("a", owner="d", ttl_s=1e6)
    for _ in range(10):  # a long outage: backs off, never gives up
        assert ledger.mark_delivery_failed(1, "a", "connection refused", owner="d", counted=False) <= 4.0
    assert ledger.mark_delivery_failed(1, "a", "RuntimeError: x", owner="d") == 4.0
    assert ledger.mark_delivery_failed(1, "a", "RuntimeError: x", owner="d") == 4.0
    assert math.isinf(ledger.mark_delivery_failed(1, "a", "RuntimeError: y", owner="d"))
    assert ledger.rows()[0]["delivery_errors"] == {"a": "failed 3 times: RuntimeError: y"}
    clock.now += 1
    assert ledger.due_deliveries("a") == [2]
    with pytest.raises(Exception, match="already undeliverable"):
        ledger.mark_delivery_failed(1, "a", "again", owner="d")


def test_requeue_makes_undeliverable_pending_again_by_step_and_logger(tmp_path: Path, make_ledger: MakeLedger) -> None:
    clock = FakeClock()
    ledger = make_ledger(tmp_path, max_delivery_attempts=1, clock=clock)
    evaluate(ledger, 1, 2)
    for logger in ("a", "b"):
        assert ledger.claim_logger(logger, owner="d")
        for step in (1, 2):
            ledger.begin_delivery(step, logger, owner="d")
            assert math.isinf(ledger.mark_delivery_failed(step, logger, "nope", owner="d"))
    with pytest.raises(ValueError, match="'c' is not configured"):
        ledger.requeue_undeliverable(logger="c")
    assert ledger.requeue_undeliverable(step=2, logger="b") == [(2, "b")]
    assert ledger.requeue_undeliverable(step=2, logger="b") == []
    assert ledger.pending_deliveries("b") == [(2, clock.now)]
    assert ledger.requeue_undeliverable(logger="a") == [(1, "a"), (2, "a")]
    assert ledger.requeue_undeliverable() == [(1, "b")]
    assert ledger.due_deliveries("a") == [1, 2] and ledger.due_deliveries("b") == [1, 2]
    # Fresh counts: one more failure is again the last one allowed, not past it.
    assert math.isinf(ledger.mark_delivery_failed(1, "a", "nope", owner="d"))
    # The attempts that may have reached the tracker are still marked for the next holder to check.
    assert set(ledger.in_flight_deliveries("b")) == {1, 2}
    for step in (1, 2):
        ledger.mark_delivered(step, "b", owner="d")
    ledger.mark_delivered(2, "a", owner="d")
    assert {row["step"]: row["state"] for row in ledger.rows()} == {1: StepState.EVALUATED, 2: StepState.DELIVERED}


def test_in_flight_mark_keeps_the_first_attempt_until_acknowledged(tmp_path: Path, make_ledger: MakeLedger) -> None:
    clock = FakeClock()
    ledger = make_ledger(tmp_path, clock=clock)
    evaluate(ledger, 1, 2)
    assert ledger.claim_logger("a", owner="d", ttl_s=1e6)
    assert ledger.in_flight_deliveries("a") == {}
    ledger.begin_delivery(1, "a", owner="d")
    first = clock.now
    ledger.mark_delivery_failed(1, "a", "timed out", owner="d", counted=False)  # it may still have landed
    clock.now += 30
    ledger.begin_delivery(1, "a", owner="d")
    assert ledger.in_flight_deliveries("a") == {1: first}
    assert ledger.in_flight_deliveries("b") == {}
    ledger.mark_delivered(1, "a", owner="d")
    assert ledger.in_flight_deliveries("a") == {}
    with pytest.raises(LeaseLostError):
        ledger.begin_delivery(2, "a", owner="someone-else")


def test_claim_logger_tells_a_takeover_from_a_renewal(tmp_path: Path, make_ledger: MakeLedger) -> None:
    clock = FakeClock()
    ledger = make_ledger(tmp_path, clock=clock)
    assert ledger.claim_logger("a", owner="d1", ttl_s=10) is LeaseClaim.ACQUIRED
    assert ledger.claim_logger("a", owner="d1", ttl_s=10) is LeaseClaim.RENEWED
    refused = ledger.claim_logger("a", owner="d2", ttl_s=10)
    assert refused is LeaseClaim.REFUSED and not refused
    clock.now += 11  # expired, but nobody took it: the holder did not miss anything
    assert ledger.claim_logger("a", owner="d1", ttl_s=10) is LeaseClaim.RENEWED
    clock.now += 11
    assert ledger.claim_logger("a", owner="d2", ttl_s=10) is LeaseClaim.ACQUIRED
    assert ledger.claim_logger("a", owner="d1", ttl_s=10) is LeaseClaim.REFUSED
    assert ledger.release_logger("a", owner="d2")
    assert ledger.claim_logger("a", owner="d1", ttl_s=10) is LeaseClaim.ACQUIRED  # d2 may have sent


def test_summary_mark_is_kept_per_logger_and_written_only_by_the_lease_holder(
        tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    assert ledger.summary_sent("a") is None
    assert ledger.claim_logger("a", owner="d")
    ledger.mark_summary_sent("a", '{"best_step": 3}', owner="d")
    with pytest.raises(LeaseLostError):
        ledger.mark_summary_sent("a", '{"best_step": 1}', owner="other")
    ledger.close()
    again = make_ledger(tmp_path)
    assert again.summary_sent("a") == '{"best_step": 3}' and again.summary_sent("b") is None


def test_a_version_1_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    for statement in _MIGRATIONS[1].split(";"):
        if statement.strip():
            raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO streams (stream_id, checkpoint_dir, config_hash) VALUES (1, '/ckpt', 'cfg')")
    for step, state in ((1, "delivered"), (2, "evaluated")):
        raw.execute("INSERT INTO steps (stream_id, step, state, attempts, result_json, updated_at) "
                    "VALUES (1, ?, ?, 1, ?, 5.0)", (step, state, encode_result(result_of(step))))
    raw.executemany(
        "INSERT INTO outbox (stream_id, step, logger, state, attempts, next_attempt_at, last_error, delivered_at) "
        "VALUES (1, ?, ?, ?, ?, 7.0, ?, ?)",
        [(1, "a", "delivered", 0, None, 6.0), (1, "b", "delivered", 2, None, 8.0),
         (2, "a", "delivered", 0, None, 9.0), (2, "b", "pending", 3, "HTTP 503", None)],
    )
    raw.close()

    ledger = new_ledger(tmp_path)
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert check.execute("PRAGMA foreign_key_check").fetchall() == []
        indexes = {row[1] for row in check.execute("PRAGMA index_list(outbox)")}
        assert "outbox_due" in indexes
        kept = check.execute("SELECT step, logger, state, attempts, failures, last_error, delivered_at "
                             "FROM outbox ORDER BY step, logger").fetchall()
    assert kept == [(1, "a", "delivered", 0, 0, None, 6.0), (1, "b", "delivered", 2, 0, None, 8.0),
                    (2, "a", "delivered", 0, 0, None, 9.0), (2, "b", "pending", 3, 0, "HTTP 503", None)]
    assert [row["state"] for row in ledger.rows()] == [StepState.DELIVERED, StepState.EVALUATED]
    stored = ledger.result(2)  # results stored before samples existed read back without any
    assert stored is not None and stored.samples == {} and stored.suite == "" and stored.metrics == {"loss": 2.0}
    # A version-1 process left no in-flight marks: its pending rows may have been sent; check them.
    assert ledger.in_flight_deliveries("b") == {2: 0.0} and ledger.in_flight_deliveries("a") == {}
    assert ledger.claim_logger("b", owner="d")
    assert math.isinf(ledger.mark_delivery_failed(2, "b", "HTTP 400", owner="d", permanent=True))
    assert ledger.rows()[1]["deliveries"] == {"a": "delivered", "b": "undeliverable"}
    ledger.close()
    assert new_ledger(tmp_path).rows()[1]["deliveries"]["b"] == "undeliverable"  # opened again: no change
