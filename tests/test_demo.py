"""`tracker-eval demo` end to end at a smaller size: every promised output exists and holds real values."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
STEPS = [20, 40, 60]


# `make demo` runs the default (a watcher beside training); --in-training also evaluates every
# other checkpoint inside the training loop.
@pytest.fixture(scope="module", params=["default", "in-training"])
def demo(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"demo-{request.param}") / "run"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    extra = ["--in-training"] if request.param == "in-training" else []
    proc = subprocess.run([EXE, "demo", "--steps", "60", "--output-dir", str(out), *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    return out, proc


def test_demo_exits_cleanly_and_prints_a_readable_summary(demo):
    out, proc = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    # No library walls (absl, wandb, mlflow, JAX) and nothing that went wrong: stderr holds only our
    # own progress lines, none of them a warning or failure.
    for line in proc.stderr.splitlines():
        assert line.startswith("tracker-eval: "), f"foreign output on stderr: {line!r}"
        assert not re.search(r"warn|fail|error|retry|given up|skipped", line, re.IGNORECASE), line
    assert not re.search(r"Traceback|warn|^wandb:|^[IWEF]\d{4} ", proc.stdout, re.IGNORECASE | re.MULTILINE)
    assert "best checkpoint: step" in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db" in proc.stdout
    assert f"wandb sync {out}/wandb/offline-run-*" in proc.stdout
    assert f"tensorboard --logdir {out}/tensorboard" in proc.stdout
    for step in STEPS:
        assert f"train: step {step:>4}/60" in proc.stdout


def test_plot_is_a_valid_png(demo):
    out, _ = demo
    import matplotlib.image as mpimg

    path = out / "eval_metrics.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # something is drawn


def test_jsonl_mlflow_wandb_and_tensorboard_hold_one_point_per_checkpoint(demo):
    out, _ = demo
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Two suites per checkpoint, one line each.
    assert sorted((r["step"], r["suite"]) for r in records) == [(s, n) for s in STEPS for n in ("train", "val")]
    loss = {r["step"]: r["metrics"]["loss"] for r in records if r["suite"] == "val"}
    train_loss = {r["step"]: r["metrics"]["loss"] for r in records if r["suite"] == "train"}
    assert loss[60] < loss[20]  # the metrics visibly improve over the checkpoints
    assert train_loss != loss
    in_training = {r["step"] for r in records if r["provenance"].get("source") == "in-training"}
    # --in-training: every other checkpoint (here 40) is evaluated inside the training loop.
    assert in_training == ({40} if out.parent.name.startswith("demo-in-training") else set())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("tracker-eval-demo")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "eval/val/loss")
    assert sorted(m.step for m in history) == STEPS
    assert {m.step: m.value for m in history} == pytest.approx(loss, rel=1e-6)
    history = client.get_metric_history(run.info.run_id, "eval/train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(train_loss, rel=1e-6)
    assert run.data.tags.get("tracker_eval.summary.best_step") == "60"

    from tracker_eval_wandb import reader
    from tracker_eval_wandb.logger import derive_run_id

    from tracker_eval.config import load_config
    from tracker_eval.identity import tracker_run_key

    config = load_config(out / "demo.yaml")
    rows = reader.read_history(out / "wandb", derive_run_id(tracker_run_key(config)))
    points = {int(r["checkpoint_step"]): r["eval/val/loss"] for r in rows if "eval/val/loss" in r}
    assert sorted(points) == STEPS and len(rows) == 2 * len(STEPS)  # one row per (step, suite)
    assert points == pytest.approx(loss, rel=1e-6)
    assert json.loads((out / "best.json").read_text())["step"] == 60

    # TensorBoard's own reader with its default settings, as `tensorboard --logdir` loads the run.
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(out / "tensorboard" / "demo-eval")).Reload()
    scalars = events.Scalars("eval/val/loss")
    assert sorted(e.step for e in scalars) == STEPS and len(scalars) == len(STEPS)
    assert {e.step: e.value for e in scalars} == pytest.approx(loss, rel=1e-6)  # stored as float32
    scalars = events.Scalars("eval/train/loss")
    assert {e.step: e.value for e in scalars} == pytest.approx(train_loss, rel=1e-6)
    assert "eval/val/per_example/example_loss" in events.Tags()["tensors"]
