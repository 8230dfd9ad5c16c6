"""The `lm_harness` suite under `tracker-eval watch`: SIGTERM stops it within seconds (one process and
two), the step is given back uncounted, and a restarted watcher scores as lm-eval's `simple_evaluate`.

The model is the byte LM paced by a file (tests/harness_models.py:make_paced_lm): every batch appends
to a marker file and sleeps what the delay file says, so a test signals while batches run and a run
left to its end would take far longer than the bound.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import pytest
from tracker_eval_lm_harness.offline import prepare_environment

prepare_environment()  # before lm-eval (and with it `datasets`) is imported by the reference

from harness_reference import ReferenceLM, tiny_lm_logits  # noqa: E402
from harness_tasks import write_shuffle_task  # noqa: E402
from reference import restored_params  # noqa: E402
from watcher_harness import EXE, WatcherProcess, child_env, ledger_rows, publish, wait_for  # noqa: E402

from tracker_eval.loggers.jsonl import read_jsonl  # noqa: E402

STOP_BOUND_S = 5.0  # the bound: exit within 5 s of the signal on a 2-core machine
SLOW_S = 0.5  # per batch while the test signals: the step's 20 batches would take 10 s or more
OPTIONS = {"kind": "lm_harness", "tasks": ["t_shuffle"], "max_length": 64, "batch_size": 2, "bootstrap_iters": 0}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Two checkpoints (steps 1 and 2) of the byte LM, and the shuffle task's folder."""
    from tracker_eval.tasks.train import train_language_model

    root = tmp_path_factory.mktemp("harness-watch")
    train_language_model(root / "ckpts", steps=2, save_every=1, batch_size=4, seq_len=32)
    return root / "ckpts", write_shuffle_task(root / "tasks")


def _config(root: pathlib.Path, tasks: pathlib.Path, *, until_step: int) -> pathlib.Path:
    config = {
        "checkpoint_dir": str(root / "ckpts"),
        "output_dir": str(root / "out"),
        "model": "harness_models:make_paced_lm",
        "model_kwargs": {"marker": str(root / "batches"), "delay_file": str(root / "delay")},
        "suites": {"harness": {**OPTIONS, "include_path": str(tasks)}},
        "loggers": [{"type": "jsonl"}],
        "watch": {"poll_interval_s": 0.3, "until_step": until_step, "idle_timeout_s": 120},
    }
    path = root / "watch.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _batches(root: pathlib.Path) -> int:
    marker = root / "batches"
    return marker.stat().st_size if marker.exists() else 0


def _simple_evaluate(params, tasks: pathlib.Path) -> dict[str, float]:
    """lm-eval's own simple_evaluate (its default seeds) over a float64 reference of `params`."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tasks)
        results = evaluator.simple_evaluate(
            model=ReferenceLM(tiny_lm_logits(params), max_length=OPTIONS["max_length"]), tasks=["t_shuffle"],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False), bootstrap_iters=0)
    values = results["results"]["t_shuffle"]
    return {"t_shuffle/acc": values["acc,none"], "t_shuffle/acc_norm": values["acc_norm,none"]}


def test_sigterm_abandons_the_harness_within_seconds_and_a_restart_scores_as_simple_evaluate(tmp_path, source):
    ckpts, tasks = source
    config = _config(tmp_path, tasks, until_step=2)
    out = tmp_path / "out"
    (tmp_path / "delay").write_text("0")
    publish(ckpts, tmp_path / "ckpts", 1)
    with WatcherProcess(config) as watcher:
        wait_for(lambda: ledger_rows(out).get(1, {}).get("state") == "delivered", timeout=180,
                 what="step 1 delivered", watchers=[watcher])
        (tmp_path / "delay").write_text(str(SLOW_S))
        before = _batches(tmp_path)
        publish(ckpts, tmp_path / "ckpts", 2)
        wait_for(lambda: _batches(tmp_path) >= before + 2, timeout=120, what="step 2's batches running",
                 watchers=[watcher])
        signalled = time.monotonic()
        watcher.signal(signal.SIGTERM)
        code = watcher.wait_exit(timeout=60)
        stop_s = time.monotonic() - signalled
    assert code == 0, watcher.tail()
    assert stop_s < STOP_BOUND_S, f"SIGTERM took {stop_s:.1f} s to stop the watcher\n{watcher.tail()}"
    assert "evaluation of step 2 abandoned" in watcher.text and "stopped (signal SIGTERM)" in watcher.text
    row = ledger_rows(out)[2]
    assert (row["state"], row["attempts"], row["metrics"]) == ("pending", 0, {}), row

    (tmp_path / "delay").write_text("0")
    with WatcherProcess(config) as again:
        code = again.wait_exit(timeout=180)
    assert code == 0, again.tail()
    assert "evaluating step 2 (suite harness)" in again.text and "evaluating step 1" not in again.text
    rows = ledger_rows(out)
    assert {step: (r["state"], r["attempts"]) for step, r in rows.items()} == {1: ("delivered", 1),
                                                                             2: ("delivered", 1)}
    # Step 1 scored by the first watcher, step 2 by the restarted one: each as lm-eval's own run.
    delivered = {r["step"]: r["metrics"] for r in read_jsonl(out / "metrics.jsonl")}
    assert sorted(delivered) == [1, 2]
    for step in (1, 2):
        want = _simple_evaluate(restored_params(tmp_path / "ckpts", step), tasks)
        assert delivered[step] == pytest.approx(want, rel=1e-9, abs=1e-12), step
    print(f"watcher stopped {stop_s:.2f} s after SIGTERM")


def test_sigterm_stops_a_two_process_harness_watch_within_seconds(tmp_path, source):
    ckpts, tasks = source
    config = _config(tmp_path, tasks, until_step=1)
    (tmp_path / "delay").write_text(str(SLOW_S))
    publish(ckpts, tmp_path / "ckpts", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [EXE, "watch", "--config", str(config), f"distributed.coordinator_address=127.0.0.1:{port}",
         "distributed.num_processes=2", f"distributed.process_id={i}", "distributed.initialization_timeout_s=60"],
        env=child_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
        for i in range(2)]
    try:
        deadline = time.monotonic() + 180
        while _batches(tmp_path) < 4:  # both processes run the step's batches
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                p.communicate(timeout=30)[0][-3000:] for p in procs if p.poll() is not None]
            time.sleep(0.05)
        signalled = time.monotonic()
        for proc in procs:
            os.kill(proc.pid, signal.SIGTERM)
        outs = [proc.communicate(timeout=60)[0] for proc in procs]
        stop_s = time.monotonic() - signalled
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], [text[-3000:] for text in outs]
    assert stop_s < STOP_BOUND_S, f"SIGTERM took {stop_s:.1f} s to stop both processes\n{outs[0][-3000:]}"
    assert "evaluation of step 1 abandoned" in outs[0] and "evaluation of step 1 abandoned" in outs[1]
    row = ledger_rows(tmp_path / "out")[1]
    assert (row["state"], row["attempts"], row["metrics"]) == ("pending", 0, {}), row
    print(f"both processes stopped {stop_s:.2f} s after SIGTERM")
