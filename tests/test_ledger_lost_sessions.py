"""A PostgreSQL ledger through lost sessions: every write happens exactly once, no caller sees the loss.

The server ends a session (`pg_terminate_backend`, as a restart or a network cut does) between
calls, in the middle of a write transaction, and while a COMMIT is on its way: each time the
ledger opens a new session, runs the whole read-then-write again only when nothing of it
committed, and the caller gets the answer it would have got without the loss. Checked against the
rows, by a session of the test's own.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures_postgres import PostgresServer

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.postgres import PostgresConnection
from tracker_eval.ledger.steps import Ledger, StepState

pytest_plugins = ["fixtures_postgres"]


def new_ledger(out: Path, url: str) -> Ledger:
    return Ledger(out, checkpoint_dir="/ckpt", config_hash="cfg", loggers=("a", "b"), url=url)


def database(url: str) -> str:
    return url.rsplit("/", 1)[1]


def ledger_sessions(server: PostgresServer, url: str, *, where: str = "true") -> list[int]:
    listed = server.sql(f"SELECT pid FROM pg_stat_activity WHERE application_name = 'tracker-eval' "
                        f"AND datname = '{database(url)}' AND {where}")
    return [int(pid) for pid in listed.split()]


def terminate(server: PostgresServer, pids: list[int]) -> None:
    for pid in pids:
        assert server.sql(f"SELECT pg_terminate_backend({pid})") == "t"


def test_a_session_the_server_ended_between_calls_is_replaced_and_the_call_goes_on(
        tmp_path: Path, postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    ledger = new_ledger(tmp_path, postgres_url)
    assert ledger.register([1]) == [1]
    terminate(postgres_server, ledger_sessions(postgres_server, postgres_url))
    with caplog.at_level(logging.WARNING, logger="tracker_eval"):
        assert ledger.register([2]) == [2]  # a write: lost at BEGIN, nothing committed, made again
        terminate(postgres_server, ledger_sessions(postgres_server, postgres_url))
        assert ledger.steps() == [1, 2]  # a read: asked again on the new session
    said = [r.getMessage() for r in caplog.records]
    assert sum("does not answer" in line for line in said) == 2, said
    assert sum("answers again" in line for line in said) == 2, said


def test_a_session_ended_mid_transaction_is_replayed_and_its_effects_happen_once(
        tmp_path: Path, postgres_server: PostgresServer, postgres_url: str) -> None:
    ledger = new_ledger(tmp_path, postgres_url)
    assert ledger.claim(5, owner="w")
    result = EvalResult(step=5, checkpoint="/ckpt/5", metrics={"loss": 0.25},
                        per_example={"loss": np.arange(4, dtype=np.float32)})
    # The test holds the outbox rows' lock, so the ledger's record stops inside its transaction:
    # step stored, result_data written, the outbox insert waiting. Then its session is ended.
    blocker = psycopg.connect(postgres_url, autocommit=True)
    blocker.execute("BEGIN")
    blocker.execute("INSERT INTO outbox (stream_id, step, logger, state, next_attempt_at) "
                    "SELECT stream_id, 5, 'a', 'pending', 0 FROM streams")
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(ledger.record_metrics(result, owner="w")))
    thread.start()
    waiting: list[int] = []

    def record_is_waiting() -> bool:
        waiting[:] = ledger_sessions(postgres_server, postgres_url, where="wait_event_type = 'Lock'")
        return bool(waiting)

    deadline = threading.Event()
    while not record_is_waiting():
        assert thread.is_alive() and not deadline.wait(0.02), "the record never waited on the outbox lock"
    terminate(postgres_server, waiting)
    blocker.execute("ROLLBACK")
    blocker.close()
    thread.join(timeout=120)
    assert outcome == [True]  # stored by the second run of the write, as if nothing happened
    assert ledger.state(5) is StepState.EVALUATED
    stored = ledger.result(5)
    assert stored is not None and stored.metrics == {"loss": 0.25}
    np.testing.assert_array_equal(stored.per_example["loss"], np.arange(4, dtype=np.float32))
    counts = postgres_server.sql(
        "SELECT (SELECT count(*) FROM outbox WHERE step = 5) || ' ' || (SELECT count(*) FROM result_data "
        "WHERE step = 5) || ' ' || (SELECT attempts FROM steps WHERE step = 5)", database=database(postgres_url))
    assert counts == "2 1 1"  # one outbox row per logger, one archive, the claim's one attempt


class _CommitGoesUnanswered:
    """Wraps a psycopg connection: its next COMMIT is sent (or not) and then the session drops, unanswered."""

    def __init__(self, raw: Any, *, commit: bool) -> None:
        self._raw, self._commit, self.fired = raw, commit, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def execute(self, sql: Any, *args: Any, **kwargs: Any) -> Any:
        if sql == "COMMIT" and not self.fired:
            self.fired = True
            if self._commit:
                self._raw.execute(sql)
            self._raw.close()  # unanswered: the caller cannot know whether it committed
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return self._raw.execute(sql, *args, **kwargs)


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
def test_a_commit_that_went_unanswered_is_resolved_by_its_token(
        tmp_path: Path, postgres_server: PostgresServer, postgres_url: str, committed: bool) -> None:
    ledger = new_ledger(tmp_path, postgres_url)
    assert ledger.claim(7, owner="w")
    conn = ledger._conn()
    assert isinstance(conn, PostgresConnection)
    wrapped = conn.raw = _CommitGoesUnanswered(conn.raw, commit=committed)
    # Ending an attempt run twice would find the claim gone and raise LeaseLostError: it runs once.
    assert ledger.mark_failed(7, "flaky", owner="w") is StepState.FAILED
    assert wrapped.fired
    row = ledger.rows()[0]
    assert (row["state"], row["owner"], row["attempts"], row["reason"]) == (StepState.FAILED, None, 1, "flaky")
