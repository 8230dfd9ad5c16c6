"""Delivery in one process: failure kinds, undeliverable results, the order of close, and how much
of a W&B run is read back when a process takes delivery over. What goes through the ledger runs on
both backends (`ledger_backends`)."""

from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest
from failing_logger import PickyLogger
from watcher_harness import jsonl_points, wait_for, write_config

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.steps import Ledger
from tracker_eval.loggers.failures import FailureKind, PermanentDeliveryError, TrackerUnavailableError, classify, mark
from tracker_eval.loggers.fanout import FanOut
from tracker_eval.loggers.session import LoggerSession
from tracker_eval.runners.delivery import Delivery

pytest_plugins = ["watcher_harness", "fixtures_postgres", "ledger_backends"]


def _result(step: int) -> EvalResult:
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": 1.0 / step, "accuracy": 0.5},
                      per_example={"file": np.arange(3, dtype=np.float32) + step}, time=1_700_000_000.0 + step)


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - an implicit __context__, as libraries that wrap errors leave it
    except BaseException as error:  # noqa: BLE001
        return error


def _raised_from(outer: BaseException, cause: BaseException | None, *, handling: BaseException) -> BaseException:
    """`outer` raised ``from cause`` (None: ``from None``) while `handling` was being handled."""
    try:
        try:
            raise handling
        except BaseException:
            raise outer from cause
    except BaseException as error:  # noqa: BLE001
        return error


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RuntimeError("parser broke"), FailureKind.TRANSIENT),
        (ValueError("bad"), FailureKind.TRANSIENT),
        (PermanentDeliveryError("HTTP 400"), FailureKind.PERMANENT),
        (TrackerUnavailableError("down"), FailureKind.UNAVAILABLE),
        (ConnectionRefusedError(111, "refused"), FailureKind.UNAVAILABLE),
        (TimeoutError("read timed out"), FailureKind.UNAVAILABLE),
        (OSError(errno.ENOSPC, "No space left on device"), FailureKind.UNAVAILABLE),
        (OSError(errno.EACCES, "Permission denied"), FailureKind.TRANSIENT),
        (_chained(RuntimeError("API request failed"), ConnectionRefusedError(111, "refused")),
         FailureKind.UNAVAILABLE),
        (_chained(RuntimeError("wrapped"), PermanentDeliveryError("HTTP 404")), FailureKind.PERMANENT),
        (mark(_chained(RuntimeError("HTTP 400"), TimeoutError()), FailureKind.PERMANENT), FailureKind.PERMANENT),
        (mark(RuntimeError("HTTP 503"), FailureKind.UNAVAILABLE), FailureKind.UNAVAILABLE),
        # A refusal raised "from None" (or from another cause) while handling a connection error is
        # not an outage: the suppressed context is no part of the chain, as in a traceback.
        (_raised_from(RuntimeError("HTTP 403 refused"), None, handling=ConnectionRefusedError(111, "refused")),
         FailureKind.TRANSIENT),
        (_raised_from(RuntimeError("HTTP 400"), ValueError("NaN"), handling=TimeoutError("timed out")),
         FailureKind.TRANSIENT),
        (_raised_from(RuntimeError("API request failed"), ConnectionRefusedError(111, "refused"),
                      handling=ValueError("parse")), FailureKind.UNAVAILABLE),
    ],
    ids=lambda v: v.value if isinstance(v, FailureKind) else type(v).__name__,
)
def test_failures_are_classified_from_what_the_logger_says_or_the_exception_chain(error, kind):
    assert classify(error) is kind


def test_a_result_a_tracker_cannot_take_does_not_hold_back_later_steps(tmp_path, ledger_url):
    ledger = Ledger(tmp_path, checkpoint_dir="/ckpt", config_hash="h", loggers=["picky"],
                    max_delivery_attempts=2, backoff_base_s=0.01, backoff_cap_s=0.05, url=ledger_url)
    # Step 2 is refused, step 3 always breaks the tracker, step 4 meets an outage longer than
    # max_delivery_attempts tries (outages never count).
    picky = PickyLogger(refuse={2}, fail={3}, outage={4}, outage_tries=4)
    session = LoggerSession(FanOut([picky], deadline_s=30), failed={}, prefix="eval")
    for step in (1, 2, 3, 4, 5):
        assert ledger.claim(step, owner="w") and ledger.record_metrics(_result(step), owner="w")
    delivery = Delivery(ledger, session, owner="d", idle_wait_s=0.02)
    delivery.start()
    try:
        wait_for(lambda: delivery.pending() == {"picky": 0}, timeout=60, what="every result settled")
    finally:
        delivery.stop()
        session.close(5)
        delivery.release()
    rows = {row["step"]: row for row in ledger.rows()}
    assert {s: r["deliveries"]["picky"] for s, r in rows.items()} == {
        1: "delivered", 2: "undeliverable", 3: "undeliverable", 4: "delivered", 5: "delivered"}
    assert picky.received == [1, 4, 5]  # in step order, the outage held step 5 back as it should
    assert picky.tries[2] == 1 and picky.tries[3] == 2 and picky.tries[4] == 5
    assert rows[2]["delivery_errors"]["picky"].startswith("refused: PermanentDeliveryError: HTTP 400")
    assert rows[3]["delivery_errors"]["picky"].startswith("failed 2 times: RuntimeError")
    assert [rows[s]["state"].value for s in (1, 2, 3, 4, 5)] == [
        "delivered", "evaluated", "evaluated", "delivered", "delivered"]
    assert (tmp_path / "ledger.sqlite").exists() == (ledger_url is None)


def test_close_gives_up_the_delivery_lease_only_after_the_loggers_calls_ended(tmp_path, ledger_backend):
    from tracker_eval.config import load_config
    from tracker_eval.runners.stream import PrimaryStream

    out = tmp_path / "out"
    # Each write to the JSONL file starts 4 s late (a slow tracker); two processes' streams share it.
    config = load_config(write_config(tmp_path, watch={}, loggers=[
        {"type": "failing_logger:SlowJsonlLogger", "id": "jsonl", "delay_s": 4.0}]))
    first = PrimaryStream.open(config)
    second = PrimaryStream.open(config)  # waits for the lease
    try:
        assert first.ledger.claim(10, owner=first.owner) and first.record(_result(10))
        wait_for(lambda: first.ledger.in_flight_deliveries("jsonl"), timeout=30, what="the first send started")
        # Closing without waiting for the outbox, with the send in flight: the lease must stay
        # until that write has landed, or the second stream takes over, does not find step 10 in
        # the file yet, and sends it again.
        first.close(drain_s=0.0, close_timeout_s=30.0)
        assert second.ledger.claim(20, owner=second.owner) and second.record(_result(20))
        wait_for(lambda: all(second.ledger.state(s).value == "delivered" for s in (10, 20)), timeout=90,
                 what="the second stream delivering after the takeover")
    finally:
        second.close(drain_s=5.0, close_timeout_s=10.0)
        first.ledger.close()
        second.ledger.close()
    assert {step: len(lines) for step, lines in jsonl_points(out).items()} == {10: 1, 20: 1}
    assert (out / "ledger.sqlite").exists() == (ledger_backend is None)


def test_wandb_start_opens_no_run_and_takeover_reads_back_only_what_was_in_flight(
        tmp_path, monkeypatch):
    import wandb
    from tracker_eval_wandb import reader
    from tracker_eval_wandb.logger import WandbConfig, WandbLogger

    from tracker_eval.loggers.base import LoggerContext

    context = LoggerContext(output_dir=str(tmp_path), run_key="takeover")
    history = WandbLogger(WandbConfig(mode="offline"), context=context)
    for step in (1, 2, 3):  # one run directory per delivered step, as the outbox makes them
        history.log_result(_result(step))
        history.flush()
    wandb.teardown()  # wandb-core may still be finishing its last file; let it end first
    old = time.time() - 3600  # these were delivered (and acknowledged) an hour ago
    for path in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
        os.utime(path, (old, old))
    began = time.time()
    history.log_result(_result(4))  # sent, then the process died before acknowledging it
    history.flush()
    assert len(reader.run_dirs(tmp_path / "wandb", history.run_id)) == 4

    reads = []
    real = reader.read_records
    monkeypatch.setattr(reader, "read_records", lambda path, **kw: reads.append(path) or real(path, **kw))
    taker = WandbLogger(WandbConfig(mode="offline"), context=context)
    taker.log_config({"model": "mlp"})
    # Starting opens no run: only the process holding the delivery lease does, for one delivery.
    assert len(reader.run_dirs(tmp_path / "wandb", history.run_id)) == 4
    taker.reconcile({})
    assert reads == []  # nothing in flight: nothing to read, however long the history
    taker.reconcile({4: began})
    assert len(reads) == 1 and "run-" in str(reads[0])  # only the newest run directory
    taker.log_result(_result(4))  # held: not sent again
    taker.log_result(_result(5))
    taker.close()
    monkeypatch.undo()
    steps = sorted(int(r["checkpoint_step"]) for r in reader.read_history(tmp_path / "wandb", history.run_id))
    assert steps == [1, 2, 3, 4, 5]
