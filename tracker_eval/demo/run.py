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
from typing import Any

import yaml

from tracker_eval.demo.beside import browse_lines, demo_loggers, fresh_dir, training_command, watch_beside_training
from tracker_eval.errors import ConfigError

DEFAULT_STEPS = 200
SAVE_EVERY = 20
TRAIN_EXAMPLES = 400  # the `train` suite: enough training examples to show the gap to `val`


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

