"""Ledger benchmarks: the ledger's own work per step on PostgreSQL against SQLite, and a poll of a long run.

`ledger_overhead_pg_vs_sqlite`: one step's ledger work as a watcher does it (register, claim, store
the result with its per-example array, begin the delivery, acknowledge it), 100 steps in a row,
on a real PostgreSQL server on loopback (durable settings, as SQLite's synchronous=FULL is) divided
by the same on the SQLite file. Medians over 3 rounds, alternating backends. Target <= 3.

`ledger_poll_1000_pg_s`: a watcher's poll of a run whose ledger holds 1,000 steps (all stored,
half of them delivered): register the 1,000 listed steps (all known), list the pending, failed and
evaluating ones, the asked-for ones and the newest, and each logger's pending deliveries. Median
of 5 polls, in seconds; `ledger_poll_1000_sqlite_s` is the same on the SQLite file.

    python -m benchmarks ledger
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

STEPS = 100
ROUNDS = 3
POLL_STEPS = 1000
POLLS = 5
LOGGERS = ("jsonl", "mlflow")


def _ledger(out: pathlib.Path, url: str | None):  # noqa: ANN202 - Ledger, imported late
    from tracker_eval.ledger.steps import Ledger  # noqa: PLC0415

    return Ledger(out, checkpoint_dir="/ckpt", config_hash="bench", loggers=LOGGERS, url=url)


def _result(step: int):  # noqa: ANN202 - EvalResult, imported late
    from tracker_eval.evaluation.result import EvalResult  # noqa: PLC0415

    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": 1.0 / step},
                      per_example={"loss": np.ones(64, np.float32)})


def _per_step_s(out: pathlib.Path, url: str | None) -> float:
    ledger = _ledger(out, url)
    try:
        for logger in LOGGERS:
            assert ledger.claim_logger(logger, owner="deliverer")
        started = time.perf_counter()
        for step in range(1, STEPS + 1):
            ledger.register([step])
            assert ledger.claim(step, owner="evaluator")
            assert ledger.record_metrics(_result(step), owner="evaluator")
            for logger in LOGGERS:
                ledger.begin_delivery(step, logger, owner="deliverer")
                ledger.mark_delivered(step, logger, owner="deliverer")
        return (time.perf_counter() - started) / STEPS
    finally:
        ledger.close()


def _poll_s(out: pathlib.Path, url: str | None) -> float:
    from tracker_eval.ledger.reads import StepState  # noqa: PLC0415

    ledger = _ledger(out, url)
    try:
        listed = list(range(1, POLL_STEPS + 1))
        ledger.register(listed)
        for logger in LOGGERS:
            assert ledger.claim_logger(logger, owner="deliverer")
        for step in listed:
            assert ledger.claim(step, owner="evaluator")
            assert ledger.record_metrics(_result(step), owner="evaluator")
            if step % 2:
                for logger in LOGGERS:
                    ledger.mark_delivered(step, logger, owner="deliverer")
        times = []
        for _ in range(POLLS):
            started = time.perf_counter()
            ledger.register(listed)
            ledger.steps(StepState.PENDING, StepState.FAILED, StepState.EVALUATING)
            ledger.asked_for()
            ledger.newest_step()
            for logger in LOGGERS:
                ledger.pending_deliveries(logger)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        ledger.close()


def run() -> dict[str, float]:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from fixtures_postgres import DURABLE_SETTINGS, PostgresServer  # noqa: PLC0415

    server = PostgresServer(settings=DURABLE_SETTINGS).start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
            root = pathlib.Path(tmp)
            per_step: dict[str, list[float]] = {"sqlite": [], "postgres": []}
            for index in range(ROUNDS):
                per_step["sqlite"].append(_per_step_s(root / f"sqlite-{index}", None))
                url = server.create_database(f"bench_{os.getpid()}_{index}")
                per_step["postgres"].append(_per_step_s(root / f"pg-{index}", url))
            poll_sqlite = _poll_s(root / "poll-sqlite", None)
            poll_pg = _poll_s(root / "poll-pg", server.create_database(f"bench_{os.getpid()}_poll"))
    finally:
        server.remove()
    sqlite_s, pg_s = (statistics.median(per_step[k]) for k in ("sqlite", "postgres"))
    return {"ledger_overhead_pg_vs_sqlite": pg_s / sqlite_s, "ledger_step_pg_ms": pg_s * 1000,
            "ledger_step_sqlite_ms": sqlite_s * 1000, "ledger_poll_1000_pg_s": poll_pg,
            "ledger_poll_1000_sqlite_s": poll_sqlite}
