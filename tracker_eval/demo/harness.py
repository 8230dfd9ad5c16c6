"""`tracker-eval demo --harness`: the byte-level LM trained on pydoc text, each checkpoint scored by
the LM Evaluation Harness on the shipped held-out pydoc tasks, curves in MLflow.

    tracker-eval demo --harness                    # runs/demo-harness, under a minute on 2 CPU cores

A training process trains TinyLM on Python's own help topics and saves a checkpoint every
`SAVE_EVERY` steps. Beside it runs the normal watcher (`tracker-eval watch`) on a config with two
suites, evaluated after one restore of each checkpoint:

    suites:
      harness: {kind: lm_harness, tasks: [pydoc], limit: 40, max_length: 256, packing: true, ...}
      text: {eval_function: tracker_eval.tasks.language_model:eval_function, data_kwargs: {corpus: pydoc}, ...}

``harness`` runs lm-eval's multiple-choice cloze, rolling perplexity and short generation tasks;
``text`` is the LM's loss on the same held-out text. Scores and per-sample records go through the
ledger to every logger exactly once (``eval/harness/pydoc_cloze/acc``, ``eval/text/loss``, ...).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from tracker_eval.demo.beside import browse_lines, demo_loggers, fresh_dir, training_command, watch_beside_training
from tracker_eval.errors import ConfigError

SAVE_EVERY = 50
DEFAULT_STEPS = 300
DEFAULT_LIMIT = 40
HARNESS_SUITE = "harness"
_LM = "tracker_eval.tasks.language_model"
# The summary's columns: suite/task/metric as the ledger keeps them (trackers add the prefix).
HEADLINE = ("harness/pydoc_cloze/acc", "harness/pydoc_cloze/acc_norm", "harness/pydoc_gen/exact_match",
            "harness/pydoc_ppl/bits_per_byte", "text/loss")


def harness_demo_config(
    output_dir: str, *, steps: int, limit: int, wandb: bool, mlflow: bool, tensorboard: bool
) -> dict[str, Any]:
    """The demo's config: the byte LM, the suites `harness` (shipped held-out tasks, `limit` documents
    each) and `text` (held-out loss), the demo's loggers."""
    return {
        "checkpoint_dir": os.path.join(output_dir, "checkpoints"),
        "model": f"{_LM}:make_model",
        "suites": {
            HARNESS_SUITE: {"kind": "lm_harness", "tasks": ["pydoc"], "limit": limit, "max_length": 256,
                            "batch_size": 32, "packing": True, "bootstrap_iters": 100},
            "text": {"eval_function": f"{_LM}:eval_function", "finalize": f"{_LM}:finalize",
                     "data": f"{_LM}:make_eval_data", "data_kwargs": {"corpus": "pydoc"}, "split": "validation",
                     "batch_size": 32},
        },
        "output_dir": output_dir,
        "watch": {"poll_interval_s": 0.5, "until_step": steps, "idle_timeout_s": 120},
        "loggers": demo_loggers(wandb=wandb, mlflow=mlflow, tensorboard=tensorboard, run_name="demo-harness"),
    }


def run_harness_demo(
    *, output_dir: str, steps: int | None, wandb: bool, mlflow: bool, tensorboard: bool, limit: int | None = None,
) -> int:
    """Trains the byte LM and watches its checkpoints with the harness suite; returns the exit code."""
    from tracker_eval.config.suites import load_kind  # noqa: PLC0415

    steps = steps or DEFAULT_STEPS
    if steps < SAVE_EVERY:
        raise ConfigError(f"--steps {steps} is below the checkpoint interval {SAVE_EVERY}; use --steps {SAVE_EVERY} "
                          "or more")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1 (documents per task)")
    try:  # before anything is written
        load_kind("lm_harness", where=f"suites.{HARNESS_SUITE}")
    except ConfigError as error:
        raise ConfigError(f"{error}; `make install` installs the lm_harness plug-in (integrations/lm_harness), "
                          "or pip install -e integrations/lm_harness") from None
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-task progress bars, one set per checkpoint
    output_dir = os.path.abspath(output_dir)
    fresh_dir(output_dir)
    config_path = os.path.join(output_dir, "demo.yaml")
    limit = limit or DEFAULT_LIMIT
    with open(config_path, "w") as f:
        yaml.safe_dump(harness_demo_config(output_dir, steps=steps, limit=limit, wandb=wandb, mlflow=mlflow,
                                           tensorboard=tensorboard), f, sort_keys=False)
    print(f"tracker-eval demo --harness: training the byte-level LM on Python's pydoc topics for {steps} steps, "
          f"a checkpoint every {SAVE_EVERY}; the watcher scores each one on the held-out pydoc tasks ({limit} "
          f"documents each) and text.\n  output: {output_dir}", flush=True)

    from tracker_eval.config import load_config  # noqa: PLC0415

    config = load_config(config_path)
    command = training_command(config.checkpoint_dir, steps=steps, save_every=SAVE_EVERY,
                               extra=["--task", "language_model"])
    return watch_beside_training(config, command=command,
                                 summary=lambda seconds: _summary(config, config_path, seconds=seconds))


def _summary(config: Any, config_path: str, *, seconds: float) -> None:
    from tracker_eval.demo.plot import plot_metrics  # noqa: PLC0415
    from tracker_eval.runners.status import collect_status  # noqa: PLC0415

    doc = collect_status(config)
    steps = [{"step": s["step"], "metrics": {name: value for suite, entry in s["suites"].items()
                                             for key, value in entry["metrics"].items()
                                             if (name := f"{suite}/{key}").removesuffix("_stderr") in HEADLINE}}
             for s in doc["steps"]]
    plot = plot_metrics(steps, os.path.join(config.output_dir, "harness_metrics.png"),
                        title="tracker-eval demo: byte LM, LM Evaluation Harness on held-out pydoc text")
    header = ["step", *HEADLINE]
    table = [header] + [[str(s["step"]), *(_cell(s["metrics"].get(n)) for n in HEADLINE)] for s in steps]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["", f"tracker-eval demo --harness finished in {seconds:.0f} s. Scores per checkpoint:", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    undelivered = [s["step"] for s in doc["steps"] if s["state"] != "delivered"]
    if undelivered:
        lines.append(f"\nsteps not (yet) delivered everywhere: {undelivered}; `tracker-eval status --config "
                     f"{config_path}` shows why")
    lines += ["", f"plot:            {plot}",
              f"samples (JSONL): {os.path.join(config.output_dir, 'metrics.samples', HARNESS_SUITE)}", ""]
    lines += browse_lines(config, config_path)
    print("\n".join(lines), flush=True)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
