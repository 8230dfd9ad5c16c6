"""Crash consistency and cross-process claims of the ledger, with real child processes, on the SQLite
file and on a real PostgreSQL database (`ledger_backends`; the children find it through
TRACKER_EVAL_LEDGER_URL)."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ledger_crash_child import LOGGERS, expected_arrays, open_ledger

from tracker_eval.ledger.steps import StepState

pytest_plugins = ["fixtures_postgres", "ledger_backends"]

CHILD = Path(__file__).with_name("ledger_crash_child.py")


def _start(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"child did not start: {line!r}"
    return proc


def _check_consistent(output_dir: Path, stored_before: dict[int, str]) -> tuple[dict[int, str], int]:
    """Asserts every invariant the ledger promises after a crash.

    Returns:
      step -> owner that stored its result, and the number of steps left mid-evaluation.
    """
    if (output_dir / "ledger.sqlite").exists():  # PostgreSQL checks its constraints at every commit
        with sqlite3.connect(output_dir / "ledger.sqlite") as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    ledger = open_ledger(str(output_dir))
    try:
        stored: dict[int, str] = {}
        rows = ledger.rows()
        for row in rows:
            state = StepState(row["state"])
            assert (state is StepState.EVALUATING) == (row["owner"] is not None), row
            if state not in (StepState.EVALUATED, StepState.DELIVERED):
                assert row["deliveries"] == {}, row
                continue
            assert set(row["deliveries"]) == set(LOGGERS), row
            all_delivered = all(v == "delivered" for v in row["deliveries"].values())
            assert all_delivered == (state is StepState.DELIVERED), row
            result = ledger.result(row["step"])
            assert result is not None
            for name, want in expected_arrays(row["step"]).items():
                got = result.per_example[name]
                assert got.dtype == want.dtype and np.array_equal(got, want), (row["step"], name)
            stored[row["step"]] = result.provenance["owner"]
        # Never lost, never stored twice: each earlier stored result is still there, unchanged.
        for step, owner in stored_before.items():
            assert stored.get(step) == owner, f"step {step} stored by {owner}, now {stored.get(step)}"
        return stored, sum(row["state"] == StepState.EVALUATING for row in rows)
    finally:
        ledger.close()


@pytest.mark.timeout(60)
def test_kill_at_random_moments_leaves_ledger_consistent(tmp_path: Path, ledger_backend: str | None) -> None:
    rng = random.Random(20261127)
    stored: dict[int, str] = {}
    owners = set()
    interrupted = 0
    for kill in range(10):
        proc = _start("loop", str(tmp_path), str(kill))
        time.sleep(rng.uniform(0.02, 0.35))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        stored, evaluating = _check_consistent(tmp_path, stored)
        interrupted += evaluating
        owners.update(stored.values())
    assert len(owners) >= 2, "the children made too little progress to test"
    assert interrupted > 0, "no kill landed mid-evaluation, so no stale claim was taken over"
    # A last child finishes everything, taking over whatever the killed ones left half done.
    proc = subprocess.run([sys.executable, str(CHILD), "drain", str(tmp_path), "99"],
                          capture_output=True, text=True, timeout=40)
    assert proc.returncode == 0, proc.stderr
    stored, _ = _check_consistent(tmp_path, stored)
    ledger = open_ledger(str(tmp_path))
    try:
        states = {row["state"] for row in ledger.rows()}
        assert states == {StepState.DELIVERED}
        assert ledger.steps() == sorted(stored)
    finally:
        ledger.close()
    assert (tmp_path / "ledger.sqlite").exists() == (ledger_backend is None)  # the children used the backend under test


@pytest.mark.timeout(60)
def test_two_processes_competing_for_the_same_steps_each_step_won_once(tmp_path: Path,
                                                                       ledger_backend: str | None) -> None:
    go = tmp_path / "go"
    n_steps = 40
    procs = [_start("compete", str(tmp_path / "out"), str(go), str(n_steps)) for _ in range(2)]
    go.touch()
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0, out
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    won = [set(o["won"]) for o in outputs]
    assert won[0].isdisjoint(won[1])
    assert won[0] | won[1] == set(range(n_steps))
    ledger = open_ledger(str(tmp_path / "out"))
    try:
        for out in outputs:
            for step in out["won"]:
                result = ledger.result(step)
                assert result is not None and result.provenance["owner"] == out["owner"]
    finally:
        ledger.close()
    assert (tmp_path / "out" / "ledger.sqlite").exists() == (ledger_backend is None)
