"""The ledger on a real SQLite file and a real PostgreSQL database (`ledger_backends`): state machine,
results, outbox, leases, best step, status."""

from __future__ import annotations

import functools
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fixtures_postgres import PostgresServer

from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger import postgres_schema
from tracker_eval.ledger.db import write_transaction
from tracker_eval.ledger.lease import make_owner_id, owner_is_dead
from tracker_eval.ledger.schema import SCHEMA_VERSION
from tracker_eval.ledger.steps import IllegalTransitionError, LeaseLostError, Ledger, LedgerError, StepState

pytest_plugins = ["fixtures_postgres", "ledger_backends"]


class FakeClock:
    """Unix time that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_ledger(out: Path, **kwargs: object) -> Ledger:
    options: dict[object, object] = {"checkpoint_dir": "/ckpt", "config_hash": "cfg", "loggers": ("a", "b")}
    options.update(kwargs)
    return Ledger(out, **options)  # type: ignore[arg-type]


MakeLedger = Callable[..., Ledger]


@pytest.fixture
def make_ledger(ledger_url: str | None) -> MakeLedger:
    """`new_ledger` on each backend in turn: the SQLite file in `out`, then a PostgreSQL database."""
    return functools.partial(new_ledger, url=ledger_url)


def result_of(step: int, **metrics: float) -> EvalResult:
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics=metrics or {"loss": float(step)},
                      per_example={"loss": np.full(3, step, np.float32)})


def evaluate(ledger: Ledger, step: int, owner: str = "w", **metrics: float) -> None:
    assert ledger.claim(step, owner=owner)
    assert ledger.record_metrics(result_of(step, **metrics), owner=owner)


def deliver(ledger: Ledger, step: int, logger: str, owner: str = "d") -> None:
    assert ledger.claim_logger(logger, owner=owner)
    ledger.mark_delivered(step, logger, owner=owner)


def dead_owner() -> str:
    """An owner id naming a process of this host that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    owner = make_owner_id(pid=int(proc.stdout))
    assert owner_is_dead(owner)
    return owner


def test_register_is_idempotent_and_lists_by_step(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    assert ledger.register([300, 100]) == [100, 300]
    assert ledger.register([200, 100]) == [200]  # a late, lower step is simply added
    assert ledger.steps() == [100, 200, 300]
    assert ledger.steps(StepState.PENDING) == [100, 200, 300]
    assert ledger.newest_step() == 300
    assert [row["step"] for row in ledger.rows()] == [100, 200, 300]


def test_happy_path_pending_evaluating_evaluated_delivered(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    ledger.register([10])
    assert ledger.claim(10, owner="w")
    assert ledger.state(10) is StepState.EVALUATING
    assert ledger.record_metrics(result_of(10), owner="w")
    assert ledger.state(10) is StepState.EVALUATED
    deliver(ledger, 10, "a")
    assert ledger.state(10) is StepState.EVALUATED  # "b" still lacks it
    deliver(ledger, 10, "b")
    assert ledger.state(10) is StepState.DELIVERED
    assert ledger.rows()[0]["attempts"] == 1


def test_without_loggers_a_stored_step_is_delivered(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path, loggers=())
    evaluate(ledger, 5)
    assert ledger.state(5) is StepState.DELIVERED


def test_illegal_transitions_are_rejected(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    evaluate(ledger, 1)
    ledger.register([2])
    assert not ledger.claim(1, owner="w")  # stored: never evaluated again
    with pytest.raises(IllegalTransitionError, match="stored result cannot be skipped"):
        ledger.mark_skipped(1, "late")
    with pytest.raises(LeaseLostError):
        ledger.mark_failed(2, "boom", owner="w")  # never claimed
    assert ledger.claim(2, owner="w")
    assert not ledger.renew(2, owner="other")
    assert not ledger.release(2, owner="other")
    with pytest.raises(LeaseLostError, match="only that owner may skip"):
        ledger.mark_skipped(2, "why", owner="other")
    with pytest.raises(LeaseLostError, match="does not hold the delivery lease"):
        ledger.mark_delivered(1, "a", owner="nobody")
    assert ledger.claim_logger("a", owner="d")
    with pytest.raises(IllegalTransitionError, match="no result queued"):
        ledger.mark_delivered(2, "a", owner="d")
    ledger.mark_delivered(1, "a", owner="d")
    with pytest.raises(IllegalTransitionError, match="already delivered"):
        ledger.mark_delivery_failed(1, "a", "late error", owner="d")
    with pytest.raises(ValueError, match="not configured"):
        ledger.due_deliveries("wandb")
    ledger.mark_skipped(3, "before start_step")
    assert ledger.state(3) is StepState.SKIPPED and not ledger.claim(3, owner="w")


def test_failed_is_retried_until_max_attempts_then_given_up(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path, max_attempts=2)
    assert ledger.claim(7, owner="w")
    assert ledger.mark_failed(7, "OOM", owner="w") is StepState.FAILED
    assert ledger.claim(7, owner="w")
    assert ledger.mark_failed(7, "OOM again", owner="w") is StepState.GIVEN_UP
    assert not ledger.claim(7, owner="w")
    row = ledger.rows()[0]
    assert (row["state"], row["reason"], row["attempts"]) == (StepState.GIVEN_UP, "OOM again", 2)


def test_release_returns_to_pending_without_using_an_attempt(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path, max_attempts=1)
    assert ledger.claim(4, owner="w")
    assert ledger.release(4, owner="w")
    assert ledger.state(4) is StepState.PENDING and ledger.rows()[0]["attempts"] == 0
    assert ledger.claim(4, owner="w2")
    assert ledger.mark_failed(4, "x", owner="w2") is StepState.GIVEN_UP


def test_result_round_trip_keeps_dtypes_order_and_non_finite_metrics(tmp_path: Path, make_ledger: MakeLedger) -> None:
    arrays = {
        "zeta": np.array([0.1, -2.5, 3e-8], dtype=np.float32),
        "ids": np.array([9, 3, 7], dtype=np.int64),
        "small": np.array([-1, 0, 1], dtype=np.int8),
        "correct": np.array([True, False, True]),
        "file": np.array(["a", "bb", "ccc"]),  # a name np.savez would reject
    }
    original = EvalResult(step=42, checkpoint="/ckpt/42",
                          metrics={"loss": 0.1 + 0.2, "nan": math.nan, "inf": math.inf, "ninf": -math.inf},
                          per_example=arrays, provenance={"config_hash": "cfg", "mesh": [2, 4]},
                          time=1234.5678901234)
    ledger = make_ledger(tmp_path)
    assert ledger.claim(42, owner="w")
    assert ledger.record_metrics(original, owner="w")
    ledger.close()
    back = make_ledger(tmp_path).result(42)
    assert back is not None
    assert (back.step, back.checkpoint, back.time, back.provenance) == (42, "/ckpt/42", 1234.5678901234,
                                                                        {"config_hash": "cfg", "mesh": [2, 4]})
    assert back.metrics["loss"] == 0.1 + 0.2 and math.isnan(back.metrics["nan"])
    assert back.metrics["inf"] == math.inf and back.metrics["ninf"] == -math.inf
    assert list(back.per_example) == list(arrays)
    for name, want in arrays.items():
        assert back.per_example[name].dtype == want.dtype
        np.testing.assert_array_equal(back.per_example[name], want)


# Records as lm-eval writes them (through json_safe): nested lists, unicode, None, exact floats.
SAMPLES = {
    "my_mc": [{"doc_id": 0, "doc": {"q": "2+2?", "choices": ["3", "4"]},
               "arguments": [["Q: 2+2?", " 3"], ["Q: 2+2?", " 4"]],
               "resps": [[[-2.5, False]], [[-0.1 + -0.2, True]]],
               "filtered_resps": [[-2.5, False], [-0.30000000000000004, True]],
               "filter": "none", "metrics": ["acc"], "acc": 1.0, "target": 1}],
    "my/odd name": [{"doc_id": 3, "resps": [["caf\u00e9 \u2603\n"]], "value": None, "big": 2**60}],
    "empty": [],
}


def test_samples_are_stored_beside_the_ledger_and_come_back_exactly(tmp_path: Path, make_ledger: MakeLedger) -> None:
    original = EvalResult(step=7, checkpoint="/ckpt/7", metrics={"my_mc/acc": 1.0}, suite="harness", samples=SAMPLES)
    ledger = make_ledger(tmp_path)
    assert ledger.claim(7, owner="w")
    assert ledger.record_metrics(original, owner="w")
    ledger.close()
    back = make_ledger(tmp_path).result(7)  # a delivery after a restart
    assert back is not None and back.suite == "harness"
    assert back.samples == SAMPLES and list(back.samples) == list(SAMPLES)
    assert back.per_example == {} and not list((tmp_path / "results").rglob("*.npz"))
    # SQLite: a folder beside the ledger; PostgreSQL: in the database, no file at all.
    folders = [p.name for p in (tmp_path / "results").rglob("*.samples")]
    assert folders == [] if ledger.data_in_database else folders != []
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_result_in_a_shared_database_is_read_back_from_another_machine_s_output_dir(
        tmp_path: Path, postgres_url: str) -> None:
    # Two evaluators on two machines: their own output_dirs, one database. What one stores, the other reads.
    arrays = {"loss": np.linspace(0, 1, 5), "file": np.arange(3), "label": np.asarray(["a", "bc"])}
    original = EvalResult(step=9, checkpoint="/ckpt/9", metrics={"loss": 0.5}, per_example=arrays,
                          suite="harness", samples=SAMPLES)
    here = new_ledger(tmp_path / "a", url=postgres_url)
    assert here.claim(9, owner="a")
    assert here.record_metrics(original, owner="a")
    elsewhere = new_ledger(tmp_path / "b", url=postgres_url)
    back = elsewhere.result(9)
    assert back is not None and back.samples == SAMPLES and list(back.samples) == list(SAMPLES)
    assert list(back.per_example) == list(arrays)
    for name, want in arrays.items():
        assert back.per_example[name].dtype == want.dtype
        np.testing.assert_array_equal(back.per_example[name], want)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "ledger.sqlite"] == []


def test_samples_that_are_not_plain_json_are_refused_and_leave_no_files(
        tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    assert ledger.claim(3, owner="w")
    bad = EvalResult(step=3, checkpoint="c", metrics={}, per_example={"x": np.zeros(2)},
                     samples={"ok": [{"a": 1}], "t": [{"a": 1}, {"score": math.nan}]})
    with pytest.raises(ValueError, match="sample 1 of task 't' cannot be stored as JSON"):
        ledger.record_metrics(bad, owner="w")
    assert ledger.state(3) is StepState.EVALUATING
    assert [p for p in tmp_path.joinpath("results").rglob("*") if p.is_file()] == []


def test_result_without_arrays_writes_no_file_and_unknown_step_is_none(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    assert ledger.claim(1, owner="w")
    assert ledger.record_metrics(EvalResult(step=1, checkpoint="c", metrics={"acc": 0.5}), owner="w")
    assert ledger.result(1) == EvalResult(step=1, checkpoint="c", metrics={"acc": 0.5},
                                          time=ledger.result(1).time)  # type: ignore[union-attr]
    assert not list((tmp_path / "results").rglob("*.npz"))
    assert ledger.result(2) is None


def test_record_by_non_holder_is_refused_and_stored_result_is_kept(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    ledger.register([5])
    with pytest.raises(LeaseLostError, match="does not hold the evaluation claim"):
        ledger.record_metrics(result_of(5), owner="w")
    assert ledger.claim(5, owner="w")
    with pytest.raises(LeaseLostError):
        ledger.record_metrics(result_of(5), owner="intruder")
    assert ledger.record_metrics(result_of(5, loss=1.0), owner="w")
    assert not ledger.record_metrics(result_of(5, loss=2.0), owner="w")
    assert not ledger.record_metrics(result_of(5, loss=3.0), owner="intruder")
    assert ledger.result(5).metrics == {"loss": 1.0}  # type: ignore[union-attr]
    np.testing.assert_array_equal(ledger.result(5).per_example["loss"], np.full(3, 5, np.float32))  # type: ignore[union-attr]
    # Refused writes left no files (PostgreSQL keeps even the stored one in the database).
    assert len(list((tmp_path / "results").rglob("*.npz"))) == (0 if ledger.data_in_database else 1)


def test_unstorable_result_is_refused_and_claim_kept(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    assert ledger.claim(3, owner="w")
    bad = EvalResult(step=3, checkpoint="c", metrics={}, per_example={"x": np.array([object()])})
    with pytest.raises(ValueError, match="dtype object"):
        ledger.record_metrics(bad, owner="w")
    with pytest.raises(ValueError, match="cannot be stored as JSON"):
        ledger.record_metrics(EvalResult(step=3, checkpoint="c", metrics={}, provenance={"f": print}), owner="w")
    assert ledger.state(3) is StepState.EVALUATING
    assert not list(tmp_path.rglob("*.npz")) and not list(tmp_path.rglob("*.tmp"))


def test_due_deliveries_in_step_order_whatever_the_evaluation_order(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    for step in (300, 100, 200):
        evaluate(ledger, step)
    assert ledger.due_deliveries("a") == [100, 200, 300]
    deliver(ledger, 200, "a")
    assert ledger.due_deliveries("a") == [100, 300]
    assert ledger.due_deliveries("b") == [100, 200, 300]


@pytest.mark.parametrize(
    ("base", "cap", "delays"),
    [(1.0, 60.0, [1.0, 2.0, 4.0, 8.0, 16.0]), (1.0, 5.0, [1.0, 2.0, 4.0, 5.0, 5.0]), (0.5, 0.5, [0.5] * 5)],
)
def test_failed_delivery_backs_off_exponentially(tmp_path: Path, make_ledger: MakeLedger, base: float, cap: float,
                                                 delays: list[float]) -> None:
    clock = FakeClock()
    ledger = make_ledger(tmp_path, backoff_base_s=base, backoff_cap_s=cap, clock=clock)
    evaluate(ledger, 1)
    assert ledger.claim_logger("a", owner="d", ttl_s=1e6)
    for delay in delays:  # an outage: never counted toward max_delivery_attempts
        assert ledger.due_deliveries("a") == [1]
        assert ledger.mark_delivery_failed(1, "a", "HTTP 503", owner="d", counted=False) == delay
        assert ledger.next_delivery_at("a") == clock.now + delay
        clock.now += delay - 0.01
        assert ledger.due_deliveries("a") == []
        clock.now += 0.01
    ledger.mark_delivered(1, "a", owner="d")
    assert ledger.next_delivery_at("a") is None


def test_new_logger_gets_backfilled_and_removed_logger_stops_holding_back(
        tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path, loggers=("a",))
    evaluate(ledger, 1)
    evaluate(ledger, 2)
    deliver(ledger, 1, "a")
    deliver(ledger, 2, "a")
    assert ledger.steps(StepState.DELIVERED) == [1, 2]
    ledger.close()
    ledger = make_ledger(tmp_path, loggers=("a", "wandb"))
    assert ledger.steps(StepState.EVALUATED) == [1, 2]
    assert ledger.due_deliveries("wandb") == [1, 2] and ledger.due_deliveries("a") == []
    deliver(ledger, 1, "wandb")
    assert ledger.state(1) is StepState.DELIVERED and ledger.state(2) is StepState.EVALUATED
    ledger.close()
    ledger = make_ledger(tmp_path, loggers=("a",))
    assert ledger.steps(StepState.DELIVERED) == [1, 2]


def test_two_ledgers_compete_for_a_step_and_exactly_one_wins(tmp_path: Path, make_ledger: MakeLedger) -> None:
    first, second = make_ledger(tmp_path), make_ledger(tmp_path)
    first.register([1])
    assert first.claim(1, owner="p1") and not second.claim(1, owner="p2")
    assert first.claim(1, owner="p1")  # the holder claiming again just renews


def test_expired_lease_is_taken_over_and_the_old_holder_refused(tmp_path: Path, make_ledger: MakeLedger) -> None:
    clock = FakeClock()
    first, second = make_ledger(tmp_path, clock=clock), make_ledger(tmp_path, clock=clock)
    assert first.claim(1, owner="p1", ttl_s=30)
    clock.now += 29
    assert first.renew(1, owner="p1", ttl_s=30)
    clock.now += 29
    assert not second.claim(1, owner="p2")  # renewed, still valid
    clock.now += 2
    assert second.claim(1, owner="p2")
    assert "lease expired" in second.rows()[0]["reason"]
    assert not first.renew(1, owner="p1")
    with pytest.raises(LeaseLostError):
        first.record_metrics(result_of(1), owner="p1")
    assert second.record_metrics(result_of(1), owner="p2")
    assert first.rows()[0]["attempts"] == 2


def test_dead_owner_lease_is_taken_over_at_once_and_live_one_is_not(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    dead, alive = dead_owner(), make_owner_id()
    assert ledger.claim(1, owner=dead, ttl_s=3600) and ledger.claim(2, owner=alive, ttl_s=3600)
    assert ledger.claim(1, owner="new") and not ledger.claim(2, owner="new")
    assert "its owner died" in ledger.rows()[0]["reason"]
    assert ledger.claim_logger("a", owner=dead, ttl_s=3600)
    assert ledger.claim_logger("a", owner="new")


def test_step_whose_evaluations_keep_dying_is_given_up(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path, max_attempts=2)
    assert ledger.claim(1, owner=dead_owner())
    assert ledger.claim(1, owner=dead_owner())
    assert not ledger.claim(1, owner="w")
    row = ledger.rows()[0]
    assert row["state"] is StepState.GIVEN_UP and row["reason"].startswith("gave up after 2 attempts")


def test_logger_lease_excludes_a_second_deliverer_until_it_expires(tmp_path: Path, make_ledger: MakeLedger) -> None:
    clock = FakeClock()
    ledger = make_ledger(tmp_path, clock=clock)
    evaluate(ledger, 1)
    assert ledger.claim_logger("a", owner="d1", ttl_s=10)
    assert not ledger.claim_logger("a", owner="d2", ttl_s=10)
    assert ledger.claim_logger("b", owner="d2", ttl_s=10)  # leases are per logger
    clock.now += 11
    assert ledger.claim_logger("a", owner="d2", ttl_s=10)
    with pytest.raises(LeaseLostError):
        ledger.mark_delivered(1, "a", owner="d1")
    assert ledger.mark_delivered(1, "a", owner="d2") and not ledger.mark_delivered(1, "a", owner="d2")
    assert ledger.release_logger("a", owner="d2") and not ledger.release_logger("a", owner="d2")


def test_threads_sharing_one_ledger_win_each_step_once(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path)
    ledger.register(range(30))
    won: list[list[int]] = [[] for _ in range(4)]

    def worker(index: int) -> None:
        for step in range(30):
            if ledger.claim(step, owner=f"t{index}"):
                won[index].append(step)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(s for steps in won for s in steps) == list(range(30))


@pytest.mark.parametrize(
    ("mode", "values", "best"),
    [
        ("min", {1: 3.0, 2: math.nan, 3: 1.0, 4: 2.0}, (3, 1.0)),
        ("max", {1: 3.0, 2: math.nan, 3: 1.0, 4: 2.0}, (1, 3.0)),
        ("min", {5: 1.0, 2: 1.0}, (2, 1.0)),  # a tie goes to the lower step
        ("max", {1: math.nan}, None),
    ],
)
def test_best_step_ignores_nan(tmp_path: Path, make_ledger: MakeLedger, mode: str, values: dict[int, float],
                               best: tuple[int, float] | None) -> None:
    ledger = make_ledger(tmp_path, best_metric="loss", best_mode=mode)
    for step, value in values.items():
        evaluate(ledger, step, loss=value, acc=-value)
    assert ledger.best() == best


def test_best_is_recomputed_when_the_tracked_metric_changes(tmp_path: Path, make_ledger: MakeLedger) -> None:
    ledger = make_ledger(tmp_path, best_metric="loss", best_mode="min")
    evaluate(ledger, 1, loss=2.0, acc=0.9)
    evaluate(ledger, 2, loss=1.0, acc=0.8)
    assert ledger.best() == (2, 1.0)
    ledger.close()
    assert make_ledger(tmp_path, best_metric="acc", best_mode="max").best() == (1, 0.9)
    assert make_ledger(tmp_path).best() is None


def test_run_state_heartbeat_and_rows_persist_per_stream(tmp_path: Path, make_ledger: MakeLedger) -> None:
    clock = FakeClock()
    ledger = make_ledger(tmp_path, clock=clock)
    other = make_ledger(tmp_path, config_hash="other-config")
    assert ledger.get_run_state("wandb") == {} and ledger.last_heartbeat() is None
    ledger.set_run_state("wandb", {"run_id": "abc", "resumed": 2})
    ledger.touch_heartbeat("watcher-1")
    evaluate(ledger, 10, loss=0.5)
    deliver(ledger, 10, "a")
    ledger.mark_skipped(20, "corrupt checkpoint")
    ledger.close()
    again = make_ledger(tmp_path)
    assert again.get_run_state("wandb") == {"run_id": "abc", "resumed": 2}
    assert again.last_heartbeat() == ("watcher-1", clock.now)
    assert again.rows() == [
        {"step": 10, "state": StepState.EVALUATED, "reason": None, "attempts": 1, "owner": None,
         "metrics": {"loss": 0.5}, "deliveries": {"a": "delivered", "b": "pending"}, "delivery_errors": {}},
        {"step": 20, "state": StepState.SKIPPED, "reason": "corrupt checkpoint", "attempts": 0, "owner": None,
         "metrics": {}, "deliveries": {}, "delivery_errors": {}},
    ]
    assert other.rows() == [] and other.get_run_state("wandb") == {} and other.last_heartbeat() is None


def test_file_is_wal_with_versioned_schema_and_newer_versions_refused(tmp_path: Path) -> None:
    new_ledger(tmp_path).close()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(LedgerError, match="schema version 99, newer"):
        new_ledger(tmp_path)


def test_processes_opening_a_new_database_at_once_create_its_schema_once(tmp_path: Path, postgres_url: str) -> None:
    # Each thread opens its own session, as processes on several machines do when they start together.
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    opened: list[Ledger] = []

    def start(index: int) -> None:
        barrier.wait()
        try:
            opened.append(new_ledger(tmp_path / str(index), url=postgres_url))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(opened) == 6
    assert opened[0].register([1]) == [1] and [ledger.steps() for ledger in opened] == [[1]] * 6


_OPEN_WHEN_TOLD = """
import pathlib, sys, time
from tracker_eval.ledger.steps import Ledger
go = pathlib.Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
Ledger(sys.argv[1], checkpoint_dir="/ckpt", config_hash="cfg", loggers=["a"]).close()
"""


def test_processes_opening_a_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    # The switch to WAL may meet "database is locked" without SQLite's busy handler waiting: before
    # it was tried again, 3 of 10 such rounds had a process fail to open the ledger.
    for round_ in range(5):
        out, go = tmp_path / f"out{round_}", tmp_path / f"go{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_WHEN_TOLD, str(out), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.touch()  # all six open the new file at once
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        assert new_ledger(out).register([1]) == [1]


def test_database_has_versioned_schema_and_newer_versions_refused(tmp_path: Path, postgres_server: PostgresServer,
                                                                  postgres_url: str) -> None:
    new_ledger(tmp_path, url=postgres_url).close()
    database = postgres_url.rsplit("/", 1)[1]
    assert postgres_server.sql("SELECT version FROM schema_version", database=database) == str(SCHEMA_VERSION)
    postgres_server.sql("UPDATE schema_version SET version = 99", database=database)
    with pytest.raises(LedgerError, match="schema version 99, newer"):
        new_ledger(tmp_path, url=postgres_url)


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT 1 FROM t WHERE a = ? AND b IN (?, ?)", "SELECT 1 FROM t WHERE a = %s AND b IN (%s, %s)"),
    ("UPDATE leases SET x = 0 WHERE name LIKE 'deliver:%' AND y = ?", "UPDATE leases SET x = 0 WHERE name LIKE "
     "'deliver:%%' AND y = %s"),
    ("SELECT 'what?', 'it''s ?', 5 % 2, ?", "SELECT 'what?', 'it''s ?', 5 %% 2, %s"),
])
def test_placeholders_become_psycopgs_and_quoted_text_keeps_its_question_marks(sql: str, expected: str) -> None:
    from tracker_eval.ledger.postgres_session import pyformat

    assert pyformat(sql) == expected


def test_a_percent_sign_and_a_question_mark_in_quoted_text_reach_the_server_as_written(
        tmp_path: Path, postgres_url: str) -> None:
    ledger = new_ledger(tmp_path, url=postgres_url)
    found = ledger._conn().execute("SELECT 'deliver:%' LIKE 'deliver:%', 'what?', ?, 7 % 4", ("x",)).fetchone()
    assert tuple(found) == (True, "what?", "x", 3)


def test_ledgers_with_their_own_output_dirs_share_one_database(tmp_path: Path, postgres_url: str) -> None:
    # As on two machines: no file in common, one record of who evaluates and delivers what.
    here, there = new_ledger(tmp_path / "here", url=postgres_url), new_ledger(tmp_path / "there", url=postgres_url)
    assert here.register([1, 2]) == [1, 2] and there.register([2, 3]) == [3]
    assert there.steps() == [1, 2, 3]
    assert here.claim(1, owner="here") and not there.claim(1, owner="there") and there.claim(2, owner="there")
    assert here.record_metrics(result_of(1), owner="here")
    assert there.state(1) is StepState.EVALUATED and there.due_deliveries("a") == [1]
    assert there.claim_logger("a", owner="there") and not here.claim_logger("a", owner="here")
    assert not (tmp_path / "here" / "ledger.sqlite").exists() and not (tmp_path / "there" / "ledger.sqlite").exists()


def test_a_writer_stalled_inside_a_write_does_not_hold_the_others_back(tmp_path: Path, postgres_url: str) -> None:
    stalled, other = new_ledger(tmp_path, url=postgres_url, busy_timeout_s=4.0), new_ledger(tmp_path, url=postgres_url)
    inside, go_on = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def stall() -> None:
        conn = stalled._conn()
        try:
            with write_transaction(conn):
                conn.execute("UPDATE streams SET best_metric = 'stalled'")
                inside.set()
                go_on.wait(timeout=60)  # stopped here, holding the write lock, as a SIGSTOPped process would
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - examined below
            outcome.append(error)

    thread = threading.Thread(target=stall)
    thread.start()
    assert inside.wait(timeout=30)
    started = time.monotonic()
    assert other.register([7]) == [7]  # waits for the server to end the stalled session, then goes on
    waited = time.monotonic() - started
    go_on.set()
    thread.join(timeout=30)
    assert 1.0 < waited < 30.0, waited
    assert len(outcome) == 1 and outcome[0] is not None  # its write was rolled back, and it is told so
    assert other.steps() == [7] and stalled.steps() == [7]  # the stalled ledger reconnects and goes on
    assert stalled._conn().execute("SELECT count(*) FROM streams WHERE best_metric = 'stalled'").fetchone()[0] == 0


def test_a_write_that_timed_out_waiting_for_the_lock_leaves_the_connection_usable(tmp_path: Path,
                                                                                  postgres_url: str) -> None:
    import psycopg

    holder, waiter = new_ledger(tmp_path, url=postgres_url), new_ledger(tmp_path, url=postgres_url, busy_timeout_s=0.3)
    conn = holder._conn()
    with write_transaction(conn):
        with pytest.raises(psycopg.errors.LockNotAvailable):
            waiter.register([1])  # as SQLite's "database is locked" after its busy timeout
    assert waiter.register([1]) == [1] and holder.steps() == [1]


def test_both_backends_hold_the_same_tables_and_columns(tmp_path: Path, postgres_server: PostgresServer,
                                                         postgres_url: str) -> None:
    assert postgres_schema.BASELINE_VERSION + len(postgres_schema._MIGRATIONS) == SCHEMA_VERSION
    new_ledger(tmp_path).close()
    new_ledger(tmp_path, url=postgres_url).close()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as raw:
        tables = [row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        in_file = {t: sorted(row[1] for row in raw.execute(f"PRAGMA table_info({t})")) for t in tables}
    listed = postgres_server.sql(
        "SELECT table_name || '.' || column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name != 'schema_version'", database=postgres_url.rsplit("/", 1)[1])
    in_database: dict[str, list[str]] = {}
    for entry in listed.splitlines():
        table, column = entry.split(".")
        in_database.setdefault(table, []).append(column)
    assert {t: sorted(c) for t, c in in_database.items()} == in_file
    assert set(in_file) == set(postgres_schema.TABLES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"best_mode": "lowest"}, "best_mode='lowest' is not one of"),
        ({"max_attempts": 0}, "max_attempts=0"),
        ({"backoff_base_s": 10.0, "backoff_cap_s": 1.0}, "backoff_base_s <= backoff_cap_s"),
        ({"loggers": ("a", "a")}, "distinct"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, make_ledger: MakeLedger, kwargs: dict[str, object],
                                         message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_ledger(tmp_path, **kwargs)


def test_output_dir_under_a_file_fails_naming_the_directory(tmp_path: Path, make_ledger: MakeLedger) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(LedgerError, match=r"output_dir '.*/file/out' is not writable.*choose another"):
        make_ledger(tmp_path / "file" / "out")


def test_existing_unwritable_output_dir_fails_naming_the_directory(tmp_path: Path, make_ledger: MakeLedger) -> None:
    if os.geteuid() == 0:
        # Root ignores permission bits; sysfs refuses new files even to root.
        unwritable = Path("/sys")
    else:
        unwritable = tmp_path / "ro"
        unwritable.mkdir(mode=0o555)
    with pytest.raises(LedgerError, match=rf"output_dir '{unwritable}' is not writable \(.+\).*"
                                          r"Make it writable by this user \(uid \d+\)"):
        make_ledger(unwritable)
    assert not (unwritable / "ledger.sqlite").exists()
