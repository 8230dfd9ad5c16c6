"""A result a tracker can never accept does not block it: undeliverable, shown by `status`, sent again
by `tracker-eval retry` once the cause is fixed, while a watcher runs."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import uuid

import numpy as np
import pytest
from watcher_harness import (
    EXE,
    METRICS,
    WatcherProcess,
    child_env,
    jsonl_points,
    ledger_rows,
    mlflow_points,
    mlflow_run,
    publish,
    reference_metrics,
    wait_for,
    write_config,
)

pytest_plugins = ["fixtures_mlflow", "watcher_harness", "fixtures_postgres", "ledger_backends"]


def _poison_config(tmp_path, *, name: str, loggers: list[dict], watch: dict):
    path = write_config(tmp_path, name=name, loggers=loggers, watch=watch)
    config = json.loads(path.read_text())
    config.update(eval_function="poison_task:eval_function", finalize="poison_task:with_nan")
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=180, env=child_env())


def test_refused_and_failing_deliveries_become_undeliverable_and_retry_sends_them(
        tmp_path, source_checkpoints, mlflow_server, ledger_backend):
    from mlflow.tracking import MlflowClient
    from reference import restored_params, validation_metrics

    from tracker_eval.loggers.jsonl import load_per_example, read_jsonl
    from tracker_eval.npz import read_npz

    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    experiment = f"poison-{uuid.uuid4().hex[:8]}"
    mlflow = {"type": "mlflow", "id": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment}
    strict = _poison_config(tmp_path, name="strict.yaml", watch={
        "poll_interval_s": 0.3, "until_step": 40, "max_delivery_attempts": 2},
        loggers=[{"type": "jsonl"}, {**mlflow, "nan_policy": "error"},
                 {"type": "failing_logger:FailingLogger", "id": "failing"}])
    for step in (20, 40):
        publish(source_checkpoints, ckpts, step)
    with WatcherProcess(strict) as watcher:
        code = watcher.wait_exit(timeout=180)
    assert code == 0, watcher.tail()
    # until_step settles at once: waiting cannot bring an undeliverable result (outbox_wait_s is 60 s).
    assert "until_step 40 reached" in watcher.text and "undelivered results wait" not in watcher.text, watcher.tail()
    rows = ledger_rows(out)
    for step in (20, 40):
        deliveries = {name: d["state"] for name, d in rows[step]["deliveries"].items()}
        assert rows[step]["state"] == "evaluated"
        assert deliveries == {"jsonl": "delivered", "mlflow": "undeliverable", "failing": "undeliverable"}, rows[step]
    assert "step 20 is undeliverable to logger 'mlflow'" in watcher.text
    assert "step 40 is undeliverable to logger 'failing'" in watcher.text

    status = _cli("status", "--config", str(strict), "--json")
    assert status.returncode == 0, status.stderr
    steps = {s["step"]: s for s in json.loads(status.stdout)["steps"]}
    errors = steps[20]["delivery_errors"]
    assert steps[20]["deliveries"]["mlflow"] == "undeliverable"
    assert errors["mlflow"].startswith("refused:") and "nan_ratio" in errors["mlflow"], errors
    assert errors["failing"].startswith("failed 2 times:") and "tracker rejected" in errors["failing"], errors
    table = _cli("status", "--config", str(strict))
    assert "undeliverable" in table.stdout and "tracker-eval retry" in table.stdout, table.stdout
    assert "step 40 -> mlflow: refused:" in table.stdout, table.stdout

    # The per-example names that break np.savez arrived in JSONL, equal to an independent reference.
    for record in read_jsonl(out / "metrics.jsonl"):
        arrays = load_per_example(out / "metrics.jsonl", record)
        losses, _ = validation_metrics(restored_params(ckpts, record["step"]))
        np.testing.assert_allclose(arrays["file"], losses, rtol=1e-5, atol=1e-6)  # float32 vs float64
        assert set(np.unique(arrays["allow_pickle"])) <= {0.0, 1.0}

    # The user fixes the cause (NaN accepted as skipped, the failing tracker removed) and re-queues
    # while a watcher runs.
    fixed = _poison_config(tmp_path, name="fixed.yaml", watch={"poll_interval_s": 0.3, "until_step": 60},
                           loggers=[{"type": "jsonl"}, {**mlflow, "nan_policy": "skip"}])
    bad = _cli("retry", "--config", str(fixed), "--logger", "mlflw")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'mlflw'" in bad.stderr, bad.stderr
    assert "configured: jsonl, mlflow" in bad.stderr
    unknown = _cli("retry", "--config", str(fixed), "--step", "30")
    assert unknown.returncode == 2 and "--step 30 is not in the ledger" in unknown.stderr, unknown.stderr
    with WatcherProcess(fixed) as watcher:
        wait_for(lambda: "watching" in watcher.text, timeout=120, what="watcher started", watchers=[watcher])
        retry = _cli("retry", "--config", str(fixed), "--logger", "mlflow")
        assert retry.returncode == 0, retry.stderr
        assert "re-queued 2 deliveries to 'mlflow': step 20 -> mlflow, step 40 -> mlflow" in retry.stdout
        wait_for(lambda: all(r["state"] == "delivered" for r in ledger_rows(out).values()), timeout=120,
                 what="re-queued results delivered by the running watcher", watchers=[watcher])
        publish(source_checkpoints, ckpts, 60)
        code = watcher.wait_exit(timeout=180)
    assert code == 0, watcher.tail()
    again = _cli("retry", "--config", str(fixed))
    assert again.returncode == 0 and "nothing to re-queue" in again.stdout, again.stdout

    rows = ledger_rows(out)
    assert {s: r["state"] for s, r in rows.items()} == {20: "delivered", 40: "delivered", 60: "delivered"}
    assert {s: len(lines) for s, lines in jsonl_points(out).items()} == {20: 1, 40: 1, 60: 1}
    history = mlflow_points(mlflow_server.url, experiment)
    assert "eval/nan_ratio" not in history  # skipped, as the fixed config says
    reference = {step: reference_metrics(ckpts, step) for step in (20, 40, 60)}
    for metric in METRICS:
        points = history[f"eval/{metric}"]
        assert collections.Counter(step for step, _ in points) == {20: 1, 40: 1, 60: 1}, (metric, points)
        for step, value in points:
            assert value == pytest.approx(rows[step]["metrics"][metric], rel=1e-12)
            assert value == pytest.approx(reference[step][metric], rel=1e-5)
    run_id = mlflow_run(mlflow_server.url, experiment).info.run_id
    local = MlflowClient(tracking_uri=mlflow_server.url).download_artifacts(
        run_id, "per_example/step_20.npz", str(tmp_path))
    arrays = read_npz(local)
    assert sorted(arrays) == ["allow_pickle", "example_accuracy", "example_loss", "file"]
    np.testing.assert_array_equal(arrays["file"], arrays["example_loss"])
    assert math.isnan(rows[20]["metrics"]["nan_ratio"])
