"""`tracker-eval watch` on a gs:// checkpoint_dir, against a real GCS server on loopback (fake-gcs-server).

Real processes throughout: a training process saving with Orbax to the bucket (and evaluating some
steps in-training), a watcher subprocess, the emulator stopped and started again for an outage.
"""

from __future__ import annotations

import json
import pathlib
import sqlite3
import subprocess
import time

import pytest
from fixtures_gcs import GcsEmulator, run_keys
from watcher_harness import (
    EXE,
    WatcherProcess,
    assert_exactly_once,
    child_env,
    ledger_rows,
    reference_metrics,
    states,
    stored_metrics,
    wait_for,
)

from tracker_eval.identity import stream_hash

pytest_plugins = ["fixtures_gcs", "watcher_harness"]

CLASSIFICATION = "tracker_eval.tasks.classification"


def _config(directory: pathlib.Path, *, checkpoint_dir: str, output_dir: pathlib.Path, watch: dict,
            data_kwargs: dict | None = None) -> pathlib.Path:
    """A watch config for the digits classifier; data waits on a hold file when `data_kwargs` name one."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "checkpoint_dir": checkpoint_dir,
        "model": f"{CLASSIFICATION}:make_model",
        "eval_function": f"{CLASSIFICATION}:eval_function",
        "data": "fixtures_gcs:held_eval_data" if data_kwargs else f"{CLASSIFICATION}:make_eval_data",
        "data_kwargs": data_kwargs or {},
        # The held data factory acts on every call (the hold is its side effect), so it must run
        # for every evaluation: the cache would serve later steps without calling it.
        "cache": "none" if data_kwargs else "host",
        "batch_size": 64,
        "output_dir": str(output_dir),
        "watch": watch,
        "loggers": [{"type": "jsonl"}, {"type": "fixtures_gcs:RunKeyLogger", "id": "run-key"}],
    }
    path = directory / "watch.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def _train_and_evaluate_in_training(config: pathlib.Path, root: str, *, save_steps: list[int],
                                    in_training: list[int]) -> None:
    """A training loop in this process saving to `root` with Orbax, evaluating `in_training` steps itself."""
    from tracker_eval import InTrainingEvaluation
    from tracker_eval.tasks.train import train_classifier

    evaluation = InTrainingEvaluation.from_config(str(config), raise_on_error=True)
    try:
        def after_save(step: int, state: object) -> None:
            if step in in_training:
                evaluation.after_checkpoint(step=step, train_state=state)

        train_classifier(root, steps=max(save_steps), save_every=10**9, save_steps=save_steps, after_save=after_save)
    finally:
        evaluation.close()


def _list_polls(gcs: GcsEmulator, bucket: str, prefix: str) -> int:
    """Listings of the step directories the server has answered so far (one per watcher poll)."""
    return gcs.request_count(f"/b/{bucket}/o?prefix={prefix}%2F&delimiter=%2F")


def _heartbeat(out: pathlib.Path) -> float:
    conn = sqlite3.connect(out / "ledger.sqlite", timeout=30)
    try:
        row = conn.execute("SELECT updated_at FROM meta WHERE key = 'heartbeat'").fetchone()
    finally:
        conn.close()
    return row[0] if row else 0.0


def test_training_on_gcs_with_a_watcher_interrupted_and_deleted_steps_and_an_outage(tmp_path, gcs, gcs_env,
                                                                                   monkeypatch):
    """One watcher over one bucket prefix, from a real training process to a server outage.

    1. A training loop (in this process) saves steps 10, 20, 30 to gs:// with Orbax and evaluates
       20 itself (InTrainingEvaluation); the watcher evaluates the others. The two run in
       different working directories and must share one stream and one tracker run identity.
    2. Step 40 is interrupted before its marker: never listed; listed once the marker appears.
    3. Step 80 is deleted after it was listed, while the watcher is busy with 60: skipped.
    4. The server is down for 10 s: the watcher keeps its heartbeat, then finds step 100.
    """
    bucket = "watched-ckpts"
    gcs.create_bucket(bucket)
    root, out, hold = f"gs://{bucket}/exp/run", tmp_path / "out", tmp_path / "hold"
    watcher_dir, trainer_dir = tmp_path / "watcher", tmp_path / "trainer"
    trainer_dir.mkdir()
    config = _config(watcher_dir, checkpoint_dir=root, output_dir=out, data_kwargs={"hold_file": str(hold)},
                     watch={"poll_interval_s": 0.5, "until_step": 100, "idle_timeout_s": 300})
    with WatcherProcess(config) as watcher:  # runs in watcher_dir
        monkeypatch.chdir(trainer_dir)
        _train_and_evaluate_in_training(config, root, save_steps=[10, 20, 30], in_training=[20])
        monkeypatch.chdir(tmp_path)
        wait_for(lambda: states(out).get(30) == "delivered", timeout=120, what="step 30", watchers=[watcher])

        gcs.copy_step(f"{root}/10", f"{root}/40", marker=False)  # a save interrupted before its marker
        polls = _list_polls(gcs, bucket, "exp%2Frun")
        wait_for(lambda: _list_polls(gcs, bucket, "exp%2Frun") >= polls + 3, timeout=60, what="3 more polls",
                 watchers=[watcher])
        assert 40 not in states(out), "a step without its commit_success.txt was listed"
        # The save finishes: 40 is picked up now. Its evaluation is held (and so is the next one)
        # while 60 and 80 are written, so that one poll finds both.
        hold.touch()
        pathlib.Path(f"{hold}.next").touch()
        gcs.write_marker(f"{root}/40")
        wait_for(lambda: states(out).get(40) == "evaluating", timeout=60, what="step 40", watchers=[watcher])
        gcs.copy_step(f"{root}/20", f"{root}/60")
        gcs.copy_step(f"{root}/30", f"{root}/80")
        hold.unlink()
        # 60 is evaluated (held) while 80 waits its turn; 80 is deleted meanwhile.
        wait_for(lambda: states(out).get(60) == "evaluating" and states(out).get(80) == "pending", timeout=60,
                 what="steps 60 (evaluating) and 80 (pending)", watchers=[watcher])
        gcs.delete_step(f"{root}/80")
        hold.unlink()
        wait_for(lambda: states(out).get(80) == "skipped", timeout=60, what="step 80 skipped", watchers=[watcher])

        # The server is down for 10 s: the watcher stays responsive (heartbeat), then goes on.
        wait_for(lambda: states(out).get(60) == "delivered", timeout=60, what="step 60", watchers=[watcher])
        gcs.stop()
        down_at, down_wall = time.monotonic(), time.time()
        wait_for(lambda: watcher.line_time("storage not answering"), timeout=60, what="outage noticed",
                 watchers=[watcher])
        wait_for(lambda: time.monotonic() - down_at >= 10 and _heartbeat(out) > down_wall + 5, timeout=60,
                 what="10 s of outage with the watcher's heartbeat going on", watchers=[watcher])
        gcs.start()
        gcs.copy_step(f"{root}/10", f"{root}/100")
        assert watcher.wait_exit(timeout=120) == 0, watcher.tail()
    assert "until_step 100 reached" in watcher.text
    assert watcher.text.count("storage not answering") == 1 and watcher.text.count("answers again") == 1

    rows = ledger_rows(out)
    evaluated = [10, 20, 30, 40, 60, 100]
    assert {s: r["state"] for s, r in rows.items()} == {**{s: "delivered" for s in evaluated}, 80: "skipped"}
    assert "no longer exists" in rows[80]["reason"], rows[80]
    assert all(rows[s]["attempts"] == 1 for s in evaluated), rows
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    in_training = sorted(line["step"] for line in lines if line["provenance"].get("source") == "in-training")
    # Each step evaluated once: 20 by whichever of the training process and the watcher claimed it first.
    watched = [s for s in watcher.evaluated_steps() if s != 80]
    assert sorted(watched + in_training) == evaluated, (watcher.evaluated_steps(), in_training)
    expected = stored_metrics(out)
    # An independent float64 forward pass over a plain Orbax restore of each step the trainer saved
    # (40, 60 and 100 are copies of 10, 20 and 10).
    references = {step: reference_metrics(root, step) for step in (10, 20, 30)}
    for step, original in {10: 10, 20: 20, 30: 30, 40: 10, 60: 20, 100: 10}.items():
        assert expected[step]["loss"] == pytest.approx(references[original]["loss"], rel=1e-5), step
        assert expected[step]["accuracy"] == pytest.approx(references[original]["accuracy"], rel=1e-9), step
    assert_exactly_once(out, expected)
    assert {line["step"]: line["checkpoint"] for line in lines} == {s: f"{root}/{s}" for s in evaluated}

    # `status` (its document) and `eval` (the command) on the same gs:// config.
    from tracker_eval.config import load_config
    from tracker_eval.runners.status import collect_status

    doc = collect_status(load_config(config))
    assert doc["newest_step"] == 100 and doc["lag_steps"] == 0
    assert {s["step"]: s["state"] for s in doc["steps"]} == {s: r["state"] for s, r in rows.items()}
    result = tmp_path / "result.json"
    command = [EXE, "eval", "--config", str(config), "--step", "40", "--output", str(result), "loggers=[]"]
    evaluated_once = subprocess.run(command, capture_output=True, text=True, timeout=240, env=child_env())
    assert evaluated_once.returncode == 0, evaluated_once.stderr
    written = json.loads(result.read_text())
    assert written["checkpoint"] == f"{root}/40"
    assert {k: written["metrics"][k] for k in expected[40]} == pytest.approx(expected[40], rel=1e-9)

    # One evaluation stream and one tracker run identity for both processes, whatever their cwd.
    conn = sqlite3.connect(out / "ledger.sqlite")
    try:
        assert conn.execute("SELECT checkpoint_dir FROM streams").fetchall() == [(root,)]
    finally:
        conn.close()
    keys = run_keys(out)
    assert {k["cwd"] for k in keys} == {str(watcher_dir), str(trainer_dir)}, keys
    assert {k["run_key"] for k in keys} == {f"{root}@{stream_hash(load_config(config))}"}, keys
