"""Multi-process evaluation over JAX's distributed runtime: 2 local processes x 4 CPU devices."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from reference import restored_params, validation_metrics
from watcher_harness import ledger_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tracker_eval.tasks.train import train_classifier

    directory = tmp_path_factory.mktemp("mh") / "ckpts"
    train_classifier(directory, steps=30, save_every=10, learning_rate=0.01)
    return directory


def _config(tmp_path, checkpoints, *, data="tracker_eval.tasks.classification:make_eval_data", extra=""):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"checkpoint_dir: {checkpoints}\n"
        "model: tracker_eval.tasks.classification:make_model\n"
        "eval_function: tracker_eval.tasks.classification:eval_function\n"
        f"data: {data}\n"
        "batch_size: 40\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "loggers: [{type: jsonl}]\n" + extra
    )
    return path


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT / "tests"))
    return env


def _start(args, *, processes: int, port: int, extra=()):
    return [
        subprocess.Popen(
            [EXE, *map(str, args), f"distributed.coordinator_address=127.0.0.1:{port}",
             f"distributed.num_processes={processes}", f"distributed.process_id={i}",
             "distributed.initialization_timeout_s=60", *extra],
            env=_env(8 // processes), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(processes)
    ]


def _finish(procs, timeout=180):
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            outs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outs


def test_two_processes_equal_one_process_eight_devices(tmp_path, checkpoints):
    config = _config(tmp_path, checkpoints)
    single = tmp_path / "single.json"
    proc = subprocess.run([EXE, "eval", "--config", config, "--output", single], env=_env(8),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    multi = tmp_path / "multi.json"
    start = time.monotonic()
    outs = _finish(_start(["eval", "--config", config, "--output", multi], processes=2, port=_free_port()))
    elapsed = time.monotonic() - start
    assert [rc for rc, _, _ in outs] == [0, 0], outs
    a, b = json.loads(single.read_text())["metrics"], json.loads(multi.read_text())["metrics"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["accuracy"] == pytest.approx(b["accuracy"], rel=1e-6)
    assert len(a["example_loss"]) == len(b["example_loss"]) == 397
    np.testing.assert_allclose(b["example_loss"], a["example_loss"], rtol=1e-6, atol=1e-7)  # same order
    # Only process 0 reported; the JSONL logger kept one line for step 30 over both runs.
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [30]
    assert "accuracy" in outs[0][1] and "accuracy" not in outs[1][1]
    # Process 1 finalized the same reduced metrics, to the last bit.
    marker = "tracker-eval: process 1: step 30 reduced metrics "
    line = next(line for line in outs[1][2].splitlines() if line.startswith(marker))
    scalars = {k: v for k, v in b.items() if not isinstance(v, list)}
    assert json.loads(line[len(marker):]) == scalars
    print(f"2-process eval wall time {elapsed:.1f} s")


def _ledger_rows(out_dir):
    # The shared reader returns {} while the file or its schema is still being created.
    return [(step, row["state"], row["attempts"]) for step, row in sorted(ledger_rows(out_dir).items())]


def test_two_process_watch_evaluates_and_delivers_each_checkpoint_once(tmp_path, checkpoints):
    config = _config(tmp_path, checkpoints, extra="watch: {poll_interval_s: 0.3, until_step: 30}\n")
    outs = _finish(_start(["watch", "--config", config], processes=2, port=_free_port()))
    assert [rc for rc, _, _ in outs] == [0, 0], outs
    rows = _ledger_rows(tmp_path / "out")
    assert rows == [(10, "delivered", 1), (20, "delivered", 1), (30, "delivered", 1)]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    # Each process read its slice of the eval set once and replayed it for the later steps.
    assert [r["provenance"]["data_from_cache"] for r in records] == [False, True, True]
    for record in records:
        losses, accuracy = validation_metrics(restored_params(checkpoints, record["step"]))
        assert record["metrics"]["loss"] == pytest.approx(losses.mean(), rel=1e-5)
        assert record["metrics"]["accuracy"] == pytest.approx(accuracy, rel=1e-6)


@pytest.mark.parametrize("victim", [1, 0])  # 0 also hosts the coordinator and holds the ledger
def test_a_dead_peer_stops_the_other_with_one_clear_line_and_restart_resumes(tmp_path, checkpoints, victim):
    config = _config(tmp_path, checkpoints, data="slow_data:make_eval_data",
                     extra="data_kwargs: {delay_s: 0.4}\nwatch: {poll_interval_s: 0.3, until_step: 30}\n")
    procs = _start(["watch", "--config", config], processes=2, port=_free_port(),
                   extra=["distributed.heartbeat_timeout_s=10"])
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until step 10 is being evaluated
            if any(state == "evaluating" for _, state, _ in _ledger_rows(tmp_path / "out")):
                break
            time.sleep(0.2)
        else:
            pytest.fail("no evaluation started")
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=120)
        survivor_s = time.monotonic() - killed_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert survivor.returncode not in (0, None)
    assert survivor_s < 120
    assert "Traceback" not in err, err[-2000:]
    if victim == 1:
        ours = [line for line in err.splitlines() if line.startswith("tracker-eval: error:")]
        assert len(ours) == 1 and "lost contact with peer process 1" in ours[0], err[-2000:]
    else:
        # Process 0 hosts JAX's coordination service. When it dies, JAX's client sees it within a
        # second and aborts from C++ before Python can act (the runtime's error callback is not
        # usable from Python in this jaxlib). Its own line says what happened.
        assert "another task died" in err, err[-2000:]
    interrupted = [step for step, state, _ in _ledger_rows(tmp_path / "out") if state == "evaluating"]
    assert interrupted, "the interrupted step must not look evaluated"
    outs = _finish(_start(["watch", "--config", config], processes=2, port=_free_port()))
    assert [rc for rc, _, _ in outs] == [0, 0], outs
    assert [state for _, state, _ in _ledger_rows(tmp_path / "out")] == ["delivered"] * 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]
    print(f"survivor stopped {survivor_s:.1f} s after process {victim} was killed")
