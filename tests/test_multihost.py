"""Multi-process evaluation over JAX's distributed runtime: 2 local processes x 4 CPU devices."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import reference
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


def _start(args, *, processes: int, port: int, extra=(), extra_for=None):
    return [
        subprocess.Popen(
            [EXE, *map(str, args), f"distributed.coordinator_address=127.0.0.1:{port}",
             f"distributed.num_processes={processes}", f"distributed.process_id={i}",
             "distributed.initialization_timeout_s=60", *extra, *(extra_for or {}).get(i, ())],
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
    # `<metric>_stderr` comes from the per-example rows, which only process 0 receives.
    scalars = {k: v for k, v in b.items() if not isinstance(v, list) and not k.endswith("_stderr")}
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


def _reduced_lines(err: str, process: int) -> dict[int, dict]:
    marker = f"tracker-eval: process {process}: step "
    found = {}
    for line in err.splitlines():
        if line.startswith(marker) and " reduced metrics " in line:
            step, _, payload = line[len(marker):].partition(" reduced metrics ")
            found[int(step)] = json.loads(payload)
    return found


def test_a_step_failing_on_one_process_is_recorded_once_and_both_go_on(tmp_path, checkpoints):
    """Process 1's data raises in the middle of step 10, and process 1 cannot read its copy of step
    20 (its checkpoint mount has a truncated shard): each time every process abandons the step (none
    waits in a collective its peer never joins), process 0 records process 1's reason once, and
    both go on to evaluate step 30 exactly."""
    heartbeat_s = 10.0
    marker = tmp_path / "failed-at"
    host1 = tmp_path / "host1-ckpts"  # what process 1 sees: step 20's array data cut short
    shutil.copytree(checkpoints, host1)
    damaged = [p for p in (host1 / "20").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert damaged
    for path in damaged:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    config = _config(tmp_path, checkpoints, data="flaky_data:make_eval_data",
                     extra=f"data_kwargs: {{marker: {marker}}}\n"
                           "watch: {poll_interval_s: 0.3, until_step: 30, max_attempts: 1}\n")
    bound_s = heartbeat_s + 30  # the bound README states
    outs = _finish(_start(["watch", "--config", config], processes=2, port=_free_port(),
                          extra=[f"distributed.heartbeat_timeout_s={heartbeat_s}"],
                          extra_for={1: [f"checkpoint_dir={host1}"]}), timeout=240)
    assert [rc for rc, _, _ in outs] == [0, 0], outs
    rows = ledger_rows(tmp_path / "out")
    assert [(step, row["state"], row["attempts"]) for step, row in sorted(rows.items())] == [
        (10, "given_up", 1), (20, "given_up", 1), (30, "delivered", 1)]
    assert rows[10]["reason"].startswith("PeerFailedError: process 1: OSError: shard 2 of host 1 is unreadable")
    assert rows[20]["reason"].startswith("PeerFailedError: process 1: CorruptCheckpointError:"), rows[20]
    assert "step 20" in rows[20]["reason"]
    # Process 0 decided within the bound after process 1 failed (both clocks are this machine's).
    failed_at = float(marker.read_text())
    with sqlite3.connect(str(tmp_path / "out" / "ledger.sqlite")) as conn:
        (decided_at,) = conn.execute("SELECT updated_at FROM steps WHERE step = 10").fetchone()
    assert 0 <= decided_at - failed_at < bound_s, (failed_at, decided_at)
    assert "step 10 failed: OSError: shard 2 of host 1" in outs[1][2], outs[1][2][-3000:]
    # Both processes evaluated the next step, and agree with an independent float64 reference.
    follower = _reduced_lines(outs[1][2], process=1)
    assert sorted(follower) == [30], outs[1][2][-3000:]
    losses, accuracy = reference.validation_metrics(reference.restored_params(checkpoints, 30))
    for metrics in (rows[30]["metrics"], follower[30]):
        assert metrics["loss"] == pytest.approx(losses.mean(), rel=1e-5)
        assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-7)
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [30]
    print(f"process 0 recorded the failure {decided_at - failed_at:.2f} s after process 1 failed")


def test_key_value_store_stays_small_and_rows_never_mix(tmp_path):
    """300 idle decisions and three evaluations (the second failing on process 1) leave a handful of
    keys; every evaluation's rows are its own; the private client still has what kvstore calls."""
    from tracker_eval import kvstore
    from tracker_eval.tasks import classification

    out, port = tmp_path / "report", _free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "kv_child.py"), str(i), str(port), str(out)],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = _finish(procs, timeout=180)
    assert [rc for rc, _, _ in outs] == [0, 0], outs
    first, second = (json.loads(pathlib.Path(f"{out}.{i}").read_text()) for i in range(2))
    # The API probe: each method tracker-eval calls exists with the parameters it passes.
    for name, parameters in kvstore.METHODS.items():
        signature = first["signatures"][name] or ""
        assert signature.startswith(f"{name}(self, "), (name, signature)
        assert all(f"{p}:" in signature for p in parameters), (name, signature)
    # Idle polling keeps the decision channel at a handful of keys (it used to keep one per poll).
    idle = first["keys_after_idle_polls"]
    assert len([k for k in idle if k.startswith("tracker_eval/test/decisions/")]) <= 2, idle
    assert len(idle) <= 6, idle
    # Every evaluation's keys are deleted once all processes are done with them.
    assert first["pending"] == 0
    assert not [k for k in first["keys_at_end"] if "/evaluation-" in k], first["keys_at_end"]
    assert len(first["keys_at_end"]) <= 6, first["keys_at_end"]
    # Step 2 failed on process 1; process 0 gave it up with process 1's reason; steps 1 and 3 are whole.
    assert second["evaluations"][1] == {"step": 2, "error": "OSError: injected read error on process 1"}
    assert first["evaluations"][1]["error"] == "PeerFailedError: process 1: OSError: injected read error on process 1"
    x, y = classification.split_digits("validation")
    params = {k: {n: np.asarray(v) for n, v in layer.items()} for k, layer in first["params"].items()}
    losses, _ = reference.mlp_losses(params, x[:150], y[:150])
    for index in (0, 2):
        assert first["evaluations"][index]["step"] == index + 1
        np.testing.assert_allclose(first["evaluations"][index]["rows"], losses, rtol=1e-5, atol=1e-6)
        for report in (first, second):
            assert report["evaluations"][index]["loss"] == pytest.approx(losses.mean(), rel=1e-5)
