"""In-training evaluation next to a real watcher subprocess: one ledger, one point per step everywhere."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from reference import validation_metrics

from tracker_eval.identity import stream_hash

pytest_plugins = ["fixtures_mlflow", "watcher_harness", "fixtures_postgres", "ledger_backends"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
STEPS = [10, 20, 30, 40, 50, 60]


def _numpy_loss(params) -> float:
    return float(validation_metrics(params)[0].mean())


def _write_config(tmp_path, extra: str) -> pathlib.Path:
    """The digits classifier's config with checkpoints in tmp_path/ckpts and output in tmp_path/out."""
    path = tmp_path / "c.yaml"
    path.write_text(
        f"checkpoint_dir: {tmp_path / 'ckpts'}\n"
        "model: tracker_eval.tasks.classification:make_model\n"
        "eval_function: tracker_eval.tasks.classification:eval_function\n"
        "data: tracker_eval.tasks.classification:make_eval_data\n"
        "batch_size: 64\n"
        f"output_dir: {tmp_path / 'out'}\n" + extra
    )
    return path


def test_training_loop_and_watcher_share_one_record(tmp_path, mlflow_server, ledger_backend):
    from mlflow.tracking import MlflowClient
    from tracker_eval_wandb import reader
    from tracker_eval_wandb.logger import derive_run_id

    from tracker_eval import InTrainingEvaluation
    from tracker_eval.config import load_config
    from tracker_eval.identity import tracker_run_key
    from tracker_eval.ledger.steps import StepState
    from tracker_eval.tasks.train import train_classifier

    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    # One experiment per run of this test: the server outlives it, and each backend's run is one run.
    experiment_name = f"in-training-{uuid.uuid4().hex[:8]}"
    config_path = _write_config(
        tmp_path,
        "watch: {poll_interval_s: 0.3, until_step: 60}\n"
        "loggers:\n"
        "  - {type: jsonl}\n"
        f"  - {{type: mlflow, tracking_uri: '{mlflow_server.url}', experiment: {experiment_name}}}\n"
        "  - {type: wandb, mode: offline}\n",
    )
    evaluation = InTrainingEvaluation.from_config(str(config_path))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    # On PostgreSQL the watcher runs as on another machine: its own working directory and output_dir.
    elsewhere = out if ledger_backend is None else tmp_path / "eval-machine" / "out"
    elsewhere.mkdir(parents=True, exist_ok=True)
    watcher = subprocess.Popen([EXE, "watch", "--config", str(config_path), f"output_dir={elsewhere}"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=elsewhere.parent)
    in_process: dict[int, tuple[float, float]] = {}

    def after_save(step, state):
        if step % 20 == 0:  # every other checkpoint here; the watcher takes the rest
            result = evaluation.after_checkpoint(step=step, train_state=state)
            if result is not None:
                in_process[step] = (result.metrics["loss"], _numpy_loss(state.params))

    try:
        train_classifier(ckpts, steps=60, save_every=10, learning_rate=0.01, after_save=after_save)
        # A step the watcher already holds comes back from the ledger, not from a new evaluation.
        deadline = time.monotonic() + 60
        while evaluation.ledger.state(10) not in (StepState.EVALUATED, StepState.DELIVERED):
            assert time.monotonic() < deadline, "the watcher never evaluated step 10"
            time.sleep(0.2)
        compiles = evaluation.compile_count
        stored = evaluation.after_checkpoint(step=10, params={"unused": np.zeros(1)})
        assert stored is not None and stored.step == 10
        assert evaluation.compile_count == compiles
        evaluation.close()
        _, err = watcher.communicate(timeout=180)
    finally:
        if watcher.poll() is None:
            watcher.kill()
        evaluation.close()
    assert watcher.returncode == 0, err[-3000:]
    assert evaluation.compile_count == 1  # one compile for the whole training run
    assert in_process, "no step was evaluated in-process"
    for step, (ours, reference) in in_process.items():
        assert ours == pytest.approx(reference, rel=1e-5), step

    config = load_config(config_path)
    from tracker_eval.ledger.steps import Ledger

    with Ledger(out, checkpoint_dir=ckpts, config_hash=stream_hash(config),
                loggers=["jsonl", "mlflow", "wandb"], url=ledger_backend) as ledger:
        rows = ledger.rows()
        expected = {step: ledger.result(step).metrics["loss"] for step in STEPS}
        sources = {step: ledger.result(step).provenance.get("source") for step in STEPS}
    assert [(r["step"], str(r["state"]), r["attempts"]) for r in rows] == [(s, "delivered", 1) for s in STEPS]
    assert (out / "ledger.sqlite").exists() == (ledger_backend is None)  # training and watcher used the backend
    assert not (elsewhere / "ledger.sqlite").exists() or elsewhere == out
    # The ledger stores whose result each is: training's for the steps it evaluated, the watcher's otherwise.
    assert {step for step, source in sources.items() if source == "in-training"} == set(in_process)

    # Each process delivers to its own output_dir's JSONL and W&B files: together they hold each step once.
    outs = sorted({out, elsewhere})
    jsonl = [json.loads(line) for o in outs if (o / "metrics.jsonl").exists()
             for line in (o / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in jsonl) == STEPS
    in_training_steps = {r["step"] for r in jsonl if r["provenance"].get("source") == "in-training"}
    assert in_training_steps == set(in_process)
    assert all(r["provenance"]["training_time_in_after_checkpoint_s"] > 0
               for r in jsonl if r["step"] in in_training_steps)

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # training and watcher attached to the same run
    history = client.get_metric_history(runs[0].info.run_id, "eval/loss")
    assert sorted(m.step for m in history) == STEPS
    assert {m.step: m.value for m in history} == pytest.approx(expected, rel=1e-6)

    rows = [row for o in outs if (o / "wandb").exists()
            for row in reader.read_history(o / "wandb", derive_run_id(tracker_run_key(config)))]
    points = sorted((int(r["checkpoint_step"]), r["eval/loss"]) for r in rows if "eval/loss" in r)
    assert [s for s, _ in points] == STEPS
    assert dict(points) == pytest.approx(expected, rel=1e-6)


def test_in_training_alone_publishes_the_best_and_a_failure_never_stops_training(tmp_path, caplog, ledger_backend):
    from tracker_eval_wandb import reader
    from tracker_eval_wandb.logger import derive_run_id

    from tracker_eval import InTrainingEvaluation
    from tracker_eval.config import load_config
    from tracker_eval.identity import tracker_run_key
    from tracker_eval.ledger.steps import StepState
    from tracker_eval.tasks.train import train_classifier

    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    config_path = _write_config(
        tmp_path,
        "watch: {best: {metric: loss, mode: max}}\n"  # max: the best is not simply the last step
        "loggers: [{type: jsonl}, {type: wandb, mode: offline}]\n",
    )
    losses: dict[int, float] = {}
    trained: list[int] = []
    with InTrainingEvaluation.from_config(str(config_path)) as evaluation:

        def after_save(step, state):
            trained.append(step)
            if step == 20:  # a broken state: recorded and warned, training goes on
                assert evaluation.after_checkpoint(step=step, params={"wrong": np.zeros(3)}) is None
                return
            losses[step] = evaluation.after_checkpoint(step=step, train_state=state).metrics["loss"]
            assert losses[step] == pytest.approx(_numpy_loss(state.params), rel=1e-5)

        train_classifier(ckpts, steps=40, save_every=10, learning_rate=0.01, after_save=after_save)
        assert trained == [10, 20, 30, 40]
        assert evaluation.ledger.state(20) == StepState.FAILED
        warned = [r.getMessage() for r in caplog.records if "in-training evaluation of step 20" in r.getMessage()]
        assert len(warned) == 1 and "\n" not in warned[0] and "kernel" in warned[0], warned
        evaluation.raise_on_error = True
        with pytest.raises(Exception, match="kernel"):  # flax: no param "kernel" in the given tree
            evaluation.after_checkpoint(step=20, params={"wrong": np.zeros(3)})
        assert evaluation.ledger.state(20) == StepState.FAILED

    best_step = max(losses, key=losses.get)
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == best_step and best["mode"] == "max"
    assert best["value"] == pytest.approx(losses[best_step], rel=1e-12)
    summary = reader.read_summary_updates(out / "wandb", derive_run_id(tracker_run_key(load_config(config_path))))
    assert summary["best_step"] == best_step


def test_an_in_training_evaluation_longer_than_the_lease_keeps_its_claim(tmp_path, source_checkpoints,
                                                                         ledger_backend):
    """An in-training evaluation taking over 3.5x `lease_ttl_s`, a watcher polling beside it: one evaluation."""
    import threading

    from reference import restored_params
    from watcher_harness import WatcherProcess, jsonl_points, ledger_rows, owner_pid, publish, wait_for, write_config

    from tracker_eval import InTrainingEvaluation
    from tracker_eval.config import load_config

    lease_ttl_s, batches = 3.0, 7  # 397 validation examples in batches of 64
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    ckpts.mkdir()
    # The watcher reads the same config, so the same slow data: a takeover would cost it as long.
    config_path = write_config(tmp_path, delay_s=3.5 * lease_ttl_s / batches + 0.05, watch={
        "poll_interval_s": 0.3, "lease_ttl_s": lease_ttl_s, "until_step": 20})
    params = restored_params(source_checkpoints, 20)
    seen: dict[str, object] = {}
    with WatcherProcess(config_path) as watcher:
        wait_for(lambda: "tracker-eval: watching" in watcher.text, timeout=120, what="watcher polling",
                 watchers=[watcher])

        def look_twice_the_lease_later() -> None:
            # Training claims step 20 before Orbax has finalized it; the watcher then finds it mid-evaluation.
            wait_for(lambda: owner_pid(ledger_rows(out).get(20, {}).get("owner")) == os.getpid(), timeout=120,
                     what="in-training claim on step 20", watchers=[watcher])
            claimed_at = time.monotonic()
            publish(source_checkpoints, ckpts, 20)
            wait_for(lambda: time.monotonic() >= claimed_at + 2 * lease_ttl_s, timeout=60, what="two lease lengths")
            row = ledger_rows(out)[20]
            seen.update(holder=owner_pid(row["owner"]), state=row["state"], watcher_running=watcher.returncode is None)

        helper = threading.Thread(target=look_twice_the_lease_later, daemon=True)
        helper.start()
        with InTrainingEvaluation(load_config(config_path)) as evaluation:
            result = evaluation.after_checkpoint(step=20, params=params)
        helper.join(timeout=130)
        code = watcher.wait_exit(timeout=120)
    assert code == 0, watcher.tail()
    # Two lease lengths into the evaluation, with the watcher polling, the step is still training's.
    assert seen == {"holder": os.getpid(), "state": "evaluating", "watcher_running": True}, (seen, watcher.tail())
    assert result is not None, "the in-training result was dropped"
    assert result.metrics["loss"] == pytest.approx(_numpy_loss(params), rel=1e-5)
    row = ledger_rows(out)[20]
    assert (row["state"], row["attempts"], row["reason"]) == ("delivered", 1, None), row
    assert watcher.evaluated_steps() == [], watcher.tail()
    assert "took over" not in watcher.text
    points = jsonl_points(out)
    assert list(points) == [20] and len(points[20]) == 1
    assert points[20][0]["loss"] == pytest.approx(result.metrics["loss"], rel=1e-12)
