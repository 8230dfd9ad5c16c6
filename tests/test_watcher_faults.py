"""Faults around the watcher: tracker outage, bad and vanished checkpoints, unwritable output, SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
from watcher_harness import (
    EXE,
    WatcherProcess,
    assert_exactly_once,
    child_env,
    ledger_rows,
    owner_pid,
    publish,
    states,
    stored_metrics,
    wait_for,
    wandb_rows,
    write_config,
)

from tracker_eval.identity import stream_hash

pytest_plugins = ["fixtures_mlflow", "watcher_harness", "fixtures_postgres", "ledger_backends"]


def test_mlflow_outage_evaluation_goes_on_backlog_arrives_in_step_order(tmp_path, source_checkpoints, mlflow_server,
                                                                        ledger_backend):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    experiment = f"watch-outage-{uuid.uuid4().hex[:8]}"
    loggers = [{"type": "jsonl"}, {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment,
                                   "timeout_s": 2, "max_retries": 0}]
    config = write_config(tmp_path, loggers=loggers, watch={"poll_interval_s": 0.3, "until_step": 80})
    publish(source_checkpoints, ckpts, 20)
    with WatcherProcess(config) as watcher:
        wait_for(lambda: states(out).get(20) == "delivered", timeout=60, what="step 20 delivered", watchers=[watcher])
        mlflow_server.stop()
        try:
            for step in (40, 60, 80):
                publish(source_checkpoints, ckpts, step)
            # Evaluation goes on while the tracker is down; MLflow's copies wait in the outbox.
            wait_for(lambda: all(r["metrics"] for s, r in ledger_rows(out).items()) and len(states(out)) == 4,
                     timeout=60, what="steps 40-80 evaluated during the outage", watchers=[watcher])
            # Tracker work yields to evaluation (tracker_eval/evaluation/activity.py): JSONL gets its copies
            # shortly after, MLflow's stay in the outbox.
            wait_for(lambda: all(ledger_rows(out)[s]["deliveries"]["jsonl"]["state"] == "delivered"
                                 for s in (40, 60, 80)),
                     timeout=60, what="steps 40-80 delivered to jsonl", watchers=[watcher])
            rows = ledger_rows(out)
            for step in (40, 60, 80):
                assert rows[step]["deliveries"]["mlflow"]["state"] == "pending", rows[step]
            assert "logger 'mlflow' failed" in watcher.text
        finally:
            mlflow_server.start()
        code = watcher.wait_exit(timeout=90)
    assert code == 0, watcher.tail()
    assert "logger 'mlflow' is back" in watcher.text
    rows = ledger_rows(out)
    assert {s: r["state"] for s, r in rows.items()} == dict.fromkeys((20, 40, 60, 80), "delivered")
    arrivals = [rows[s]["deliveries"]["mlflow"]["delivered_at"] for s in (20, 40, 60, 80)]
    assert arrivals == sorted(arrivals), f"MLflow backlog not delivered in step order: {arrivals}"
    assert_exactly_once(out, stored_metrics(out), mlflow=(mlflow_server.url, experiment))


def test_until_step_with_a_dead_tracker_stops_after_the_outbox_wait(tmp_path, source_checkpoints, ledger_backend):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    with socket.socket() as s:  # a port nobody listens on: the tracker is down for the whole run
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    loggers = [{"type": "jsonl"}, {"type": "mlflow", "tracking_uri": dead, "timeout_s": 1, "max_retries": 0}]
    config = write_config(tmp_path, loggers=loggers,
                          watch={"poll_interval_s": 0.3, "until_step": 20, "outbox_wait_s": 4})
    publish(source_checkpoints, ckpts, 20)
    with WatcherProcess(config) as watcher:
        wait_for(lambda: states(out).get(20) == "evaluated", timeout=60, what="step 20 evaluated",
                 watchers=[watcher], interval=0.05)
        evaluated_at = time.monotonic()
        code = watcher.wait_exit(timeout=60)
        stop_s = time.monotonic() - evaluated_at
    assert code == 0, watcher.tail()
    # outbox_wait_s (4 s) once, then at most 5 s to close the dead tracker; a bound, not a speed.
    assert stop_s < 4 + 5 + 6, f"stopping took {stop_s:.1f} s after step 20 was evaluated"
    assert "until_step 20 reached" in watcher.text and "wait in the outbox" in watcher.text
    row = ledger_rows(out)[20]
    assert row["state"] == "evaluated" and row["deliveries"]["jsonl"]["state"] == "delivered"
    assert row["deliveries"]["mlflow"]["state"] == "pending", row  # kept for the next run, never lost


def test_a_logger_that_could_not_start_is_started_again_and_gets_every_result(tmp_path, source_checkpoints,
                                                                              ledger_backend):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    loggers = [{"type": "jsonl"}, {"type": "failing_logger:FlakyStartLogger", "id": "flaky", "fail_starts": 2}]
    config = write_config(tmp_path, loggers=loggers, watch={"poll_interval_s": 0.3, "until_step": 40})
    publish(source_checkpoints, ckpts, 20)
    publish(source_checkpoints, ckpts, 40)
    with WatcherProcess(config) as watcher:
        code = watcher.wait_exit(timeout=120)
    assert code == 0, watcher.tail()
    assert "logger 'flaky' could not start" in watcher.text
    assert "logger 'flaky' started on a later attempt" in watcher.text
    assert (out / "flaky-start-attempts").read_text() == "3"
    rows = ledger_rows(out)
    assert {s: r["deliveries"]["flaky"]["state"] for s, r in rows.items()} == {20: "delivered", 40: "delivered"}
    lines = (out / "flaky-start.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [20, 40]


def _truncate_arrays(step_dir) -> None:
    data_files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files, f"no array data files under {step_dir}"
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(max(0, path.stat().st_size // 3))


def test_truncated_checkpoint_given_up_vanished_one_skipped_later_steps_go_on(tmp_path, source_checkpoints,
                                                                              ledger_backend):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    broken = tmp_path / "broken"
    shutil.copytree(source_checkpoints / "40", broken / "40")
    _truncate_arrays(broken / "40")
    config = write_config(tmp_path, delay_s=0.3, watch={"poll_interval_s": 0.3, "until_step": 80, "max_attempts": 2})
    publish(source_checkpoints, ckpts, 20)
    publish(source_checkpoints, ckpts, 60)
    with WatcherProcess(config) as watcher:
        # Step 60 is found, then deleted (e.g. by checkpoint retention) while step 20 is evaluated.
        wait_for(lambda: states(out) == {20: "evaluating", 60: "pending"}, timeout=60,
                 what="step 20 evaluating, step 60 waiting", watchers=[watcher], interval=0.02)
        shutil.rmtree(ckpts / "60")
        publish(broken, ckpts, 40)
        publish(source_checkpoints, ckpts, 80)
        code = watcher.wait_exit(timeout=90)
    assert code == 0, watcher.tail()
    rows = ledger_rows(out)
    assert {s: r["state"] for s, r in rows.items()} == {20: "delivered", 40: "given_up", 60: "skipped", 80: "delivered"}
    assert rows[40]["attempts"] == 2 and "Corrupt" in rows[40]["reason"] and "40" in rows[40]["reason"], rows[40]
    assert "step 40 failed (will retry)" in watcher.text and "step 40 given up after 2 attempts" in watcher.text
    assert "no longer exists" in rows[60]["reason"] and rows[60]["attempts"] == 1, rows[60]
    assert watcher.evaluated_steps().count(40) == 2
    # The failed reads' leftovers (Orbax coroutines, closed event loops) never reach the log.
    assert "Traceback" not in watcher.text and "Exception ignored" not in watcher.text, watcher.tail()
    assert_exactly_once(out, stored_metrics(out))


def test_a_watcher_that_lost_its_claim_drops_that_result_with_one_warning_and_goes_on(tmp_path, source_checkpoints,
                                                                                      ledger_backend):
    from tracker_eval.config import load_config
    from tracker_eval.ledger.steps import Ledger

    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    config = write_config(tmp_path, delay_s=0.3, watch={"poll_interval_s": 0.3, "lease_ttl_s": 1, "until_step": 40})
    publish(source_checkpoints, ckpts, 20)
    publish(source_checkpoints, ckpts, 40)
    loaded = load_config(config)
    with WatcherProcess(config) as watcher:
        wait_for(lambda: owner_pid(ledger_rows(out).get(20, {}).get("owner")) == watcher.pid
                 and 20 in watcher.evaluated_steps(), timeout=120, what="watcher evaluating step 20",
                 watchers=[watcher], interval=0.02)
        # Suspended past its lease (a paused VM, a stalled disk): another process takes the step over.
        watcher.signal(signal.SIGSTOP)
        try:
            with Ledger(out, checkpoint_dir=loaded.checkpoint_dir, config_hash=stream_hash(loaded),
                        loggers=["jsonl"], url=ledger_backend) as other:
                wait_for(lambda: other.claim(20, owner="other-holder", ttl_s=600), timeout=60,
                         what="the lease of step 20 to expire", interval=0.1)
        finally:
            watcher.signal(signal.SIGCONT)
        wait_for(lambda: "claim was taken over" in watcher.text, timeout=120, what="the lost-claim warning",
                 watchers=[watcher])
        with Ledger(out, checkpoint_dir=loaded.checkpoint_dir, config_hash=stream_hash(loaded),
                    loggers=["jsonl"], url=ledger_backend) as other:
            assert other.release(20, owner="other-holder")  # handed back: evaluated again, once
        code = watcher.wait_exit(timeout=120)
    assert code == 0, watcher.tail()
    warnings = [line for _, line in watcher.lines if "claim was taken over" in line]
    assert len(warnings) == 1 and "step 20" in warnings[0] and "other-holder" in warnings[0], warnings
    assert "Traceback" not in watcher.text, watcher.tail()
    assert sorted(watcher.evaluated_steps()) == [20, 20, 40]  # 40 may come before the second 20
    rows = ledger_rows(out)
    assert {s: (r["state"], r["attempts"]) for s, r in rows.items()} == {20: ("delivered", 2), 40: ("delivered", 1)}
    assert_exactly_once(out, stored_metrics(out))


def test_unwritable_output_dir_is_one_line_exit_2(tmp_path, ledger_backend):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be\n")
    config = write_config(tmp_path, output_dir=blocker / "out", watch={"idle_timeout_s": 5})
    (tmp_path / "ckpts").mkdir()
    proc = subprocess.run([EXE, "watch", "--config", str(config)], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("tracker-eval: error:") and "output_dir" in lines[0] and str(blocker) in lines[0]


def test_an_unreachable_ledger_database_is_one_line_exit_2(tmp_path):
    from fixtures_postgres import free_port

    secret = "Watch-pw-9173"
    config = write_config(tmp_path, watch={"idle_timeout_s": 5})
    (tmp_path / "ckpts").mkdir()
    url = f"postgresql://evaluator:{secret}@127.0.0.1:{free_port()}/evals"
    proc = subprocess.run([EXE, "watch", "--config", str(config), f"ledger.url={url}"], capture_output=True,
                          text=True, timeout=120, env=child_env())
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("tracker-eval: error: cannot reach the ledger database postgresql://***@127.0.0.1:")
    assert "start the server" in lines[0] and secret not in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "ledger.sqlite").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_abandons_evaluation_flushes_and_next_run_evaluates_it(tmp_path, source_checkpoints, signum,
                                                                       ledger_backend):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    config = write_config(tmp_path, loggers=[{"type": "jsonl"}, {"type": "wandb"}], delay_s=0.5,
                          watch={"poll_interval_s": 0.3, "idle_timeout_s": 4})
    publish(source_checkpoints, ckpts, 20)
    publish(source_checkpoints, ckpts, 40)
    with WatcherProcess(config) as watcher:
        # Step 20's delivery may wait for step 40's evaluation (trackers yield to evaluation).
        wait_for(lambda: states(out).get(20) in ("evaluated", "delivered") and states(out).get(40) == "evaluating",
                 timeout=90, what="step 20 stored and step 40 evaluating", watchers=[watcher], interval=0.02)
        time.sleep(0.5)  # into step 40's batches (each takes 0.5 s)
        signalled = time.monotonic()
        watcher.signal(signum)
        code = watcher.wait_exit(timeout=30)
        stop_s = time.monotonic() - signalled
    assert code == 0, watcher.tail()
    assert stop_s < 10, f"{signum.name} took {stop_s:.1f} s to stop the watcher"
    assert "evaluation of step 40 abandoned" in watcher.text and f"stopped (signal {signum.name})" in watcher.text
    rows = ledger_rows(out)
    assert rows[40]["state"] == "pending" and rows[40]["attempts"] == 0 and not rows[40]["metrics"], rows[40]
    # Step 20 was flushed at stop, or waits in the outbox for the next run: never lost, never twice.
    assert [int(r["checkpoint_step"]) for r in wandb_rows(out) if "checkpoint_step" in r] in ([20], [])

    with WatcherProcess(config) as again:
        code = again.wait_exit(timeout=90)
    assert code == 0, again.tail()
    assert again.evaluated_steps() == [40]
    rows = ledger_rows(out)
    assert {s: (r["state"], r["attempts"]) for s, r in rows.items()} == {20: ("delivered", 1), 40: ("delivered", 1)}
    assert_exactly_once(out, stored_metrics(out), wandb=True)
