"""A trainer saving with Orbax's default asynchronous checkpointing while the watcher runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from reference import validation_metrics
from watcher_harness import (
    TESTS,
    WatcherProcess,
    assert_exactly_once,
    child_env,
    ledger_rows,
    stored_metrics,
    wait_for,
    write_config,
)

STEPS = [10, 20, 30]


def _params(path) -> dict[str, dict[str, np.ndarray]]:
    params: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as saved:
        for key in saved.files:
            layer, name = key.split("/")
            params.setdefault(layer, {})[name] = saved[key]
    return params


def test_async_saves_are_evaluated_once_each_and_only_once_orbax_finalized_them(tmp_path):
    ckpts, out, params_dir = tmp_path / "ckpts", tmp_path / "out", tmp_path / "params"
    config = write_config(tmp_path, watch={"poll_interval_s": 0.3, "until_step": STEPS[-1]})
    early: dict[int, list[str]] = {}  # step -> what the directory held when the ledger already knew it

    def registered_only_when_finalized() -> None:
        # The ledger registers what the listing calls finalized; every such step must be a
        # finished directory, never Orbax's in-flight <step>.orbax-checkpoint-tmp.
        for step in ledger_rows(out):
            if not (ckpts / str(step)).is_dir():
                early.setdefault(step, sorted(p.name for p in ckpts.iterdir()))

    with WatcherProcess(config) as watcher:
        wait_for(lambda: "tracker-eval: watching" in watcher.text, timeout=120, what="watcher polling",
                 watchers=[watcher])
        trainer = subprocess.Popen(
            [sys.executable, str(TESTS / "async_trainer.py"), str(ckpts), str(params_dir),
             "--steps", *map(str, STEPS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(devices=1))
        try:
            # The watcher may stop at until_step before the trainer has exited: not watched for here.
            wait_for(lambda: registered_only_when_finalized() or trainer.poll() is not None, timeout=600,
                     what="the trainer's last save", interval=0.02)
            report, errors = trainer.communicate(timeout=60)
        finally:
            trainer.kill()
        assert trainer.returncode == 0, errors[-3000:]
        code = watcher.wait_exit(timeout=300)
    assert code == 0, watcher.tail()
    assert early == {}, f"steps registered before Orbax finalized them: {early}"

    saves = [json.loads(line) for line in report.splitlines() if line.startswith("{")]
    assert [s["step"] for s in saves] == STEPS
    # Each save() returned while Orbax was still writing the step in the background.
    assert all(s["in_flight"] for s in saves), saves
    print("async save to finalization (s):", [s.get("finalize_s") for s in saves])

    rows = ledger_rows(out)
    assert {s: (r["state"], r["attempts"]) for s, r in rows.items()} == {s: ("delivered", 1) for s in STEPS}
    assert sorted(watcher.evaluated_steps()) == STEPS  # none missed, none twice
    for step in STEPS:
        losses, accuracy = validation_metrics(_params(params_dir / f"{step}.npz"))
        assert rows[step]["metrics"]["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
        assert rows[step]["metrics"]["accuracy"] == pytest.approx(accuracy, rel=1e-9)
    assert_exactly_once(out, stored_metrics(out))
