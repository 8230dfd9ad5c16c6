"""`tracker-eval watch` as a real subprocess: every checkpoint once, stop conditions, status, best, policies."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import uuid

import pytest
from watcher_harness import (
    EXE,
    WatcherProcess,
    assert_equal_to_reference,
    assert_exactly_once,
    child_env,
    jsonl_points,
    ledger_rows,
    mlflow_run,
    publish,
    start_writer,
    states,
    stored_metrics,
    wait_for,
    wandb_summary,
    write_config,
)

pytest_plugins = ["fixtures_mlflow", "watcher_harness", "fixtures_postgres", "ledger_backends"]


def test_writer_and_watcher_every_checkpoint_once_until_step_status_and_best(tmp_path, mlflow_server, ledger_backend):
    save_steps = [10, 20, 30, 40]
    experiment = f"watch-basic-{uuid.uuid4().hex[:8]}"
    loggers = [{"type": "jsonl"}, {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment},
               {"type": "wandb"}]
    config = write_config(tmp_path, loggers=loggers, watch={
        "poll_interval_s": 0.3, "until_step": save_steps[-1], "idle_timeout_s": 120,
        "best": {"metric": "loss", "mode": "min"}})
    out, ckpts = tmp_path / "out", tmp_path / "ckpts"
    # The watcher starts before the training job has created its checkpoint directory.
    with WatcherProcess(config) as watcher:
        writer = start_writer(ckpts, save_steps=save_steps, pause_s=1.0)
        try:
            writer_out, _ = writer.communicate(timeout=120)
        finally:
            writer.kill()
        assert writer.returncode == 0, writer_out
        code = watcher.wait_exit(timeout=120)
        assert code == 0, watcher.tail()
    assert "until_step 40 reached" in watcher.text
    assert sorted(watcher.evaluated_steps()) == save_steps

    rows = ledger_rows(out)
    assert {s: r["state"] for s, r in rows.items()} == {s: "delivered" for s in save_steps}
    assert {s: r["attempts"] for s, r in rows.items()} == {s: 1 for s in save_steps}
    expected = stored_metrics(out)
    assert_equal_to_reference(expected, ckpts, save_steps)
    assert_exactly_once(out, expected, mlflow=(mlflow_server.url, experiment), wandb=True)

    status = subprocess.run([EXE, "status", "--config", str(config), "--json"], capture_output=True, text=True,
                            timeout=60, env=child_env())
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert {"steps", "newest_step", "lag_steps"} <= set(doc)
    assert doc["newest_step"] == 40 and doc["lag_steps"] == 0
    assert [s["step"] for s in doc["steps"]] == save_steps
    for entry in doc["steps"]:
        assert {"step", "state", "reason", "metrics", "deliveries"} <= set(entry)
        assert entry["state"] == "delivered" and entry["reason"] is None
        assert entry["metrics"] == pytest.approx(expected[entry["step"]], rel=1e-12)
        assert entry["deliveries"] == {"jsonl": "delivered", "mlflow": "delivered", "wandb": "delivered"}

    best_step = min(save_steps, key=lambda s: expected[s]["loss"])
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == best_step and best["metric"] == "loss" and best["mode"] == "min"
    assert best["value"] == pytest.approx(expected[best_step]["loss"], rel=1e-12)
    assert best["checkpoint"].endswith(f"/{best_step}")
    assert mlflow_run(mlflow_server.url, experiment).data.tags["tracker_eval.summary.best_step"] == str(best_step)
    summary = wandb_summary(out)
    assert summary["best_step"] == best_step
    assert summary["best_loss"] == pytest.approx(expected[best_step]["loss"], rel=1e-12)

    # A crash between the ledger's commit and best.json: the next start writes it from the ledger.
    (out / "best.json").unlink()
    with WatcherProcess(config) as again:
        assert again.wait_exit(timeout=120) == 0, again.tail()
    assert again.evaluated_steps() == []
    assert json.loads((out / "best.json").read_text()) == best


def test_tmp_dir_never_evaluated_late_lower_step_evaluated_idle_timeout_stops(tmp_path, source_checkpoints,
                                                                              ledger_backend):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    ckpts.mkdir()
    # An in-progress save that never finishes: a full copy under Orbax's temporary name.
    shutil.copytree(source_checkpoints / "120", ckpts / "120.orbax-checkpoint-tmp")
    publish(source_checkpoints, ckpts, 60)
    idle_s = 8
    config = write_config(tmp_path, watch={"poll_interval_s": 0.3, "idle_timeout_s": idle_s})
    with WatcherProcess(config) as watcher:
        # A lower step written elsewhere and renamed in once a higher one was taken. Published as soon
        # as step 60 is claimed: the idle clock then cannot run out before it, however busy the machine.
        wait_for(lambda: states(out).get(60) in ("evaluating", "evaluated", "delivered"), timeout=120,
                 what="step 60 taken", watchers=[watcher], interval=0.02)
        publish(source_checkpoints, ckpts, 20, staging=tmp_path / "elsewhere")
        wait_for(lambda: states(out).get(20) == "delivered", timeout=120, what="late step 20 delivered",
                 watchers=[watcher])
        late_at = time.monotonic()
        code = watcher.wait_exit(timeout=idle_s + 120)
        idle_stop_s = time.monotonic() - late_at
    assert code == 0, watcher.tail()
    assert f"no new checkpoint for {idle_s} s" in watcher.text
    assert idle_stop_s < idle_s + 60, f"idle_timeout_s={idle_s} took {idle_stop_s:.1f} s to stop the watcher"
    assert watcher.evaluated_steps() == [60, 20]
    assert states(out) == {20: "delivered", 60: "delivered"}  # 120 was never even registered
    assert_exactly_once(out, stored_metrics(out))


@pytest.mark.parametrize(
    "policy, present, late, evaluated, skipped_reason",
    [
        # latest: older pending steps are skipped; a late lower step is skipped too.
        ("latest", [20, 40, 60], [(80, 80), (20, 70)], [60, 80], "policy latest"),
        ({"every_n_steps": 40}, [20, 40, 60, 80], [(100, 100), (120, 120)], [40, 80, 120], "every_n_steps=40"),
    ],
    ids=["latest", "every_n_steps"],
)
def test_policies_record_skipped_steps_with_reason(tmp_path, source_checkpoints, policy, present, late, evaluated,
                                                   skipped_reason, ledger_backend):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    for step in present:
        publish(source_checkpoints, ckpts, step)
    # No idle timeout: on a busy machine it could fire before the next step is published. The test
    # ends the watch itself, with SIGTERM, once everything has settled.
    config = write_config(tmp_path, watch={"poll_interval_s": 0.3, "policy": policy})
    with WatcherProcess(config) as watcher:
        for source_step, step in late:
            wait_for(lambda: all(s in ("delivered", "skipped") for s in states(out).values()) and states(out),
                     timeout=120, what="every known step settled", watchers=[watcher])
            publish(source_checkpoints, ckpts, source_step, as_step=step)
            wait_for(lambda step=step: states(out).get(step) in ("delivered", "skipped"), timeout=120,
                     what=f"step {step} settled", watchers=[watcher])
        watcher.signal(signal.SIGTERM)
        code = watcher.wait_exit(timeout=120)
    assert code == 0, watcher.tail()
    assert "stopped (signal SIGTERM)" in watcher.text
    rows = ledger_rows(out)
    known = sorted({*present, *(step for _, step in late)})
    assert sorted(rows) == known
    assert sorted(s for s, r in rows.items() if r["state"] == "delivered") == evaluated
    for step in sorted(set(known) - set(evaluated)):
        assert rows[step]["state"] == "skipped" and skipped_reason in rows[step]["reason"], rows[step]
        assert rows[step]["attempts"] == 0
    assert sorted(watcher.evaluated_steps()) == evaluated
    assert sorted(jsonl_points(out)) == evaluated
    assert_exactly_once(out, stored_metrics(out))
