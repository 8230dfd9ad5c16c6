"""`tracker-eval demo`: the whole product on a laptop, no account and no server.

A training process trains the built-in digits classifier and writes Orbax checkpoints every few
steps; the watcher beside it evaluates each one as it appears, in two suites after one restore
(``val``: the held-out split; ``train``: the first 400 training examples, to see the gap), and logs
to the console, JSONL, MLflow (an embedded sqlite store), W&B (offline) and TensorBoard event
files. At the end: a table per checkpoint, the best checkpoint, a PNG plot, and the commands to
browse the results.

    tracker-eval demo                       # runs/demo, ~20 s after install on 2 CPU cores
    tracker-eval demo --in-training         # every other checkpoint evaluated inside training
    tracker-eval demo --harness             # the byte LM, scored by the LM Evaluation Harness (demo/harness.py)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from tracker_eval.errors import ConfigError

_MARKER = ".tracker-eval-demo"
DEFAULT_STEPS = 200
SAVE_EVERY = 20
TRAIN_EXAMPLES = 400  # the `train` suite: enough training examples to show the gap to `val`


def demo_loggers(*, wandb: bool, mlflow: bool, tensorboard: bool, run_name: str = "demo-eval") -> list[dict[str, Any]]:
    """The demo's loggers: console and JSONL always, the trackers unless switched off (all local)."""
    loggers: list[dict[str, Any]] = [{"type": "console"}, {"type": "jsonl"}]
    if mlflow:
        loggers.append({"type": "mlflow", "experiment": "tracker-eval-demo", "run_name": run_name})
    if wandb:
        loggers.append({"type": "wandb", "project": "tracker-eval-demo", "mode": "offline", "name": run_name})
    if tensorboard:
        loggers.append({"type": "tensorboard", "run_name": run_name})
    return loggers


def demo_config(output_dir: str, *, steps: int, wandb: bool, mlflow: bool, tensorboard: bool = True) -> dict[str, Any]:
    """The embedded defaults of the demo (written to <output_dir>/demo.yaml for later commands)."""
    loggers = demo_loggers(wandb=wandb, mlflow=mlflow, tensorboard=tensorboard)
    task = "tracker_eval.tasks.classification"
    suite = {"eval_function": f"{task}:eval_function", "data": f"{task}:make_eval_data", "batch_size": 64}
    return {
        "checkpoint_dir": os.path.join(output_dir, "checkpoints"),
        "model": f"{task}:make_model",
        "suites": {
            "val": {**suite, "split": "validation"},
            "train": {**suite, "split": "train", "data_kwargs": {"limit": TRAIN_EXAMPLES}},
        },
        "output_dir": output_dir,
        "watch": {"poll_interval_s": 1.0, "until_step": steps, "idle_timeout_s": 120,
                  "best": {"suite": "val", "metric": "loss", "mode": "min"}},
        "loggers": loggers,
    }


def run_demo(
    *, output_dir: str = "runs/demo", steps: int | None = None, wandb: bool = True, mlflow: bool = True,
    tensorboard: bool = True, in_training: bool = False, harness: bool = False, limit: int | None = None,
) -> int:
    """Runs training and the watcher side by side (with `harness`: the LM and the harness suite);
    returns the exit code."""
    if harness:
        if in_training:
            raise ConfigError("--harness and --in-training do not go together; choose one")
        from tracker_eval.demo.harness import run_harness_demo  # noqa: PLC0415

        return run_harness_demo(output_dir=output_dir, steps=steps, wandb=wandb, mlflow=mlflow,
                                tensorboard=tensorboard, limit=limit)
    if limit is not None:
        raise ConfigError("--limit sets the harness suite's documents per task; use it with --harness")
    steps = steps or DEFAULT_STEPS
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"the demo needs {', '.join(missing)} (its dataset and plot); install them with "
            "pip install 'tracker-eval[demo]', or run `make demo`, which installs everything"
        )
    if steps < SAVE_EVERY:
        raise ConfigError(
            f"--steps {steps} is below the checkpoint interval {SAVE_EVERY}; use --steps {SAVE_EVERY} or more"
        )
    output_dir = os.path.abspath(output_dir)
    fresh_dir(output_dir)
    config_path = os.path.join(output_dir, "demo.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(demo_config(output_dir, steps=steps, wandb=wandb, mlflow=mlflow, tensorboard=tensorboard), f,
                       sort_keys=False)
    print(f"tracker-eval demo: training the digits classifier for {steps} steps, a checkpoint every "
          f"{SAVE_EVERY}; the watcher evaluates each one as it appears.\n  output: {output_dir}", flush=True)

    from tracker_eval.config import load_config  # noqa: PLC0415

    config = load_config(config_path)
    extra = ["--in-training-config", config_path] if in_training else []
    return watch_beside_training(config, command=training_command(config.checkpoint_dir, steps=steps,
                                                                  save_every=SAVE_EVERY, extra=extra),
                                 summary=lambda seconds: _summary(config, config_path, seconds=seconds))


def training_command(checkpoint_dir: str, *, steps: int, save_every: int, extra: Sequence[str] = ()) -> list[str]:
    """The demo's training process (`tracker_eval.demo.train`) with its checkpoint settings and `extra` flags."""
    return [sys.executable, "-m", "tracker_eval.demo.train", "--checkpoint-dir", checkpoint_dir,
            "--steps", str(steps), "--save-every", str(save_every), *extra]


def watch_beside_training(config: Any, *, command: Sequence[str], summary: Callable[[float], None]) -> int:
    """Runs the watcher on `config` while the training process `command` writes its checkpoints.

    Args:
      config: the demo's loaded config; its ``watch.until_step`` ends the watcher.
      command: the training process.
      summary: called with the seconds taken once both are done, unless training failed.

    Returns:
      The watcher's exit code, or 1 when the training process failed.
    """
    from tracker_eval.runners.watcher import Watcher  # noqa: PLC0415

    watcher = Watcher(config)
    watcher.install_signal_handlers()
    trainer = subprocess.Popen(command, env={k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"})
    start = time.monotonic()
    try:
        code = watcher.run()
    finally:
        # Training ends on its own (it may still be delivering in-training results); a signal
        # or a failed watcher stops it.
        try:
            trainer.wait(timeout=0.1 if watcher.stop_reason.startswith("signal") else 120)
        except subprocess.TimeoutExpired:
            pass
        if trainer.poll() is None:
            trainer.terminate()
            trainer.wait(timeout=30)
    if trainer.returncode not in (0, None) and not watcher.stop_reason.startswith("signal"):
        print(f"tracker-eval demo: the training process failed (exit {trainer.returncode})", file=sys.stderr)
        return 1
    summary(time.monotonic() - start)
    return code


def fresh_dir(output_dir: str) -> None:
    """Starts from an empty directory; only a previous demo's directory is ever removed."""
    if os.path.exists(output_dir):
        if not os.path.exists(os.path.join(output_dir, _MARKER)):
            if os.listdir(output_dir):
                raise ConfigError(f"--output-dir {output_dir!r} exists and is not a demo directory; "
                                  "choose another --output-dir (the demo starts from an empty one)")
        else:
            shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    open(os.path.join(output_dir, _MARKER), "w").close()


def _summary(config: Any, config_path: str, *, seconds: float) -> None:
    from tracker_eval.demo.plot import plot_metrics  # noqa: PLC0415
    from tracker_eval.runners.status import collect_status, format_table  # noqa: PLC0415

    doc = collect_status(config)
    best = doc["best"]
    # One panel per suite and metric ("val/loss", "train/loss", ...).
    points = [{"step": s["step"], "metrics": {f"{name}/{k}": v for name, entry in s.get("suites", {}).items()
                                              for k, v in entry["metrics"].items()} or s.get("metrics", {})}
              for s in doc["steps"]]
    plot = plot_metrics(points, os.path.join(config.output_dir, "eval_metrics.png"),
                        title="tracker-eval demo: digits classifier, suites val and train",
                        best_step=best["step"] if best else None)
    out = config.output_dir
    lines = ["", f"tracker-eval demo finished in {seconds:.0f} s. Metrics per checkpoint:", "",
             format_table(doc, prefix=config.metric_prefix), ""]
    if best:
        lines.append(f"best checkpoint: step {best['step']} ({best.get('suite', '')} loss {best['value']:.4f}), "
                     f"{os.path.join(config.checkpoint_dir, str(best['step']))}")
    lines += [f"plot:            {plot}", f"metrics (JSONL): {os.path.join(out, 'metrics.jsonl')}", ""]
    lines += browse_lines(config, config_path)
    print("\n".join(lines), flush=True)


def browse_lines(config: Any, config_path: str) -> list[str]:
    """The commands that open each configured tracker's view of the demo's results."""
    bin_dir = os.path.dirname(sys.executable)
    out = config.output_dir
    lines = ["browse the results:"]
    types = {spec.get("type") for spec in config.loggers}
    if "mlflow" in types:
        lines.append(f"  {bin_dir}/mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db --port 5000"
                     "   # then open http://127.0.0.1:5000")
    if "wandb" in types:
        lines.append(f"  {bin_dir}/wandb sync {out}/wandb/offline-run-*   # after `wandb login`")
    if "tensorboard" in types:
        lines.append(f"  {bin_dir}/tensorboard --logdir {out}/tensorboard --port 6006   # then open http://127.0.0.1:6006")
    lines.append(f"  {bin_dir}/tracker-eval status --config {config_path}")
    return lines
