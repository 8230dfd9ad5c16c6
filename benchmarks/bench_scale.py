"""Scaling out: a backlog of checkpoints worked off by 1 watcher and by 4 sharing one PostgreSQL ledger.

`backfill_scaling_4`: the time 1 watcher takes to evaluate and deliver a backlog of 40 steps,
divided by the time 4 watchers take together. Each watcher runs as on a machine of its own (its
own working directory and output_dir; the checkpoints and the database are all they share). The
watchers are started and left idle first, then the 40 steps are published at once; the clock runs
from the publishing to the moment the ledger holds every step delivered, so the processes' start
(imports, JAX) is not counted, while each watcher's first compilation is. Each evaluation is
wait-bound (its data factory sleeps `DELAY_S` before each of its 7 batches), as an evaluation
that waits on a remote input pipeline or an accelerator is: this machine has 2 cores, and CPU-bound
evaluations could not run 4 at once faster than 2. Target >= 3.5.

    python -m benchmarks scale
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

STEPS = 40
WATCHERS = 4
DELAY_S = 0.25


def _backlog_s(root: pathlib.Path, source: pathlib.Path, url: str, count: int) -> float:
    from watcher_harness import WatcherProcess, ledger_rows, publish, wait_for, write_config  # noqa: PLC0415

    os.environ["TRACKER_EVAL_LEDGER_URL"] = url
    ckpts = root / "ckpts"
    ckpts.mkdir(parents=True)
    watchers = []
    try:
        for index in range(count):
            home = root / f"machine-{index}"
            home.mkdir()
            config = write_config(home, checkpoint_dir=ckpts, delay_s=DELAY_S, loggers=[{"type": "jsonl"}],
                                  watch={"poll_interval_s": 0.2, "lease_ttl_s": 60, "policy": "all"})
            watchers.append(WatcherProcess(config).start())
        wait_for(lambda: all("tracker-eval: watching" in w.text for w in watchers), timeout=300,
                 what="every watcher up", watchers=watchers)
        staging = root / "staging"
        started = time.monotonic()
        for step in range(1, STEPS + 1):
            publish(source, ckpts, 20, as_step=step, staging=staging)
        wait_for(lambda: [r["state"] for r in ledger_rows(root).values()] == ["delivered"] * STEPS, timeout=900,
                 what=f"{STEPS} steps delivered", watchers=watchers, interval=0.1)
        elapsed = time.monotonic() - started
    finally:
        for watcher in watchers:
            watcher.kill9()
    evaluated = sorted(s for w in watchers for s in w.evaluated_steps())
    assert evaluated == list(range(1, STEPS + 1)), f"steps evaluated {evaluated}"
    return elapsed


def run() -> dict[str, float]:
    tests = pathlib.Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    from fixtures_postgres import PostgresServer  # noqa: PLC0415

    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    before = os.environ.get("TRACKER_EVAL_LEDGER_URL")
    server = PostgresServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            root = pathlib.Path(tmp)
            source = root / "source"
            train_classifier(source, steps=20, save_every=20)
            one = _backlog_s(root / "one", source, server.create_database(f"scale_{os.getpid()}_1"), 1)
            four = _backlog_s(root / "four", source, server.create_database(f"scale_{os.getpid()}_4"), WATCHERS)
    finally:
        server.remove()
        if before is None:
            os.environ.pop("TRACKER_EVAL_LEDGER_URL", None)
        else:
            os.environ["TRACKER_EVAL_LEDGER_URL"] = before
    return {"backfill_scaling_4": one / four, "backfill_1_watcher_s": one, "backfill_4_watchers_s": four}
