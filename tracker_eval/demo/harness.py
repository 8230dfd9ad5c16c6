"""`tracker-eval demo --harness`: the byte-level LM trained on pydoc text, scored per checkpoint by
the LM Evaluation Harness on the shipped held-out pydoc tasks, curves in MLflow.

    tracker-eval demo --harness                    # runs/demo-harness, 1-2 minutes on 2 CPU cores

A training process trains TinyLM on Python's own help topics and saves a checkpoint every
`SAVE_EVERY` steps. Beside it, this process restores each finalized checkpoint's params onto the
mesh (through the stream's `Pipeline`), runs the `lm_harness` suite on them (multiple-choice cloze,
rolling perplexity, short generation) and records the scores, per-sample records included, in the
stream's ledger, from where the normal delivery sends them to every logger exactly once.

The suite is found through the ``tracker_eval.suites`` entry-point group, as the stream's
``suites:`` block will find it; until that block exists, `HarnessEvaluation` does per checkpoint
what it will do. Switching over is the config change below and `tracker-eval watch`:

    suites:
      harness: {kind: lm_harness, tasks: [pydoc], limit: 40, max_length: 256, packing: true, ...}
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import yaml

from tracker_eval.errors import ConfigError, one_line

SUITE_NAME = "harness"
SUITE_GROUP = "tracker_eval.suites"
SAVE_EVERY = 50
DEFAULT_STEPS = 300
DEFAULT_LIMIT = 40
# What `suites: {harness: ...}` will hold: the shipped tasks on documents the LM never trained on.
SUITE = {"kind": "lm_harness", "tasks": ["pydoc"], "limit": DEFAULT_LIMIT, "max_length": 256, "batch_size": 32,
         "packing": True, "bootstrap_iters": 100}
HEADLINE = ("pydoc_cloze/acc", "pydoc_cloze/acc_norm", "pydoc_gen/exact_match", "pydoc_ppl/bits_per_byte")


def harness_demo_config(output_dir: str, *, steps: int, wandb: bool, mlflow: bool, tensorboard: bool) -> dict[str, Any]:
    """The stream of the harness demo: the byte LM on the held-out pydoc text, the demo's loggers."""
    from tracker_eval.demo.run import demo_loggers  # noqa: PLC0415

    return {
        "checkpoint_dir": os.path.join(output_dir, "checkpoints"),
        "model": "tracker_eval.tasks.language_model:make_model",
        "eval_function": "tracker_eval.tasks.language_model:eval_function",
        "finalize": "tracker_eval.tasks.language_model:finalize",
        "data": "tracker_eval.tasks.language_model:make_eval_data",
        "data_kwargs": {"corpus": "pydoc"},
        "split": "validation",
        "batch_size": 32,
        "output_dir": output_dir,
        "watch": {"poll_interval_s": 0.5, "until_step": steps, "idle_timeout_s": 120},
        "loggers": demo_loggers(wandb=wandb, mlflow=mlflow, tensorboard=tensorboard, run_name="demo-harness"),
    }


def suite_class(kind: str) -> Any:
    """The suite class registered as `kind` in the ``tracker_eval.suites`` entry-point group.

    Raises:
      ConfigError: no installed plug-in registers `kind`.
    """
    found = {entry.name: entry for entry in importlib.metadata.entry_points(group=SUITE_GROUP)}
    if kind not in found:
        raise ConfigError(
            f"suite kind {kind!r} is not installed (installed: {sorted(found) or 'none'}); `make install` "
            "installs the lm_harness plug-in (integrations/lm_harness), or pip install -e integrations/lm_harness"
        )
    return found[kind].load()


class HarnessEvaluation:
    """Per checkpoint: restore params, run the suite, record the result (scores and samples) in the stream.

    Args:
      config: the stream's config (model, mesh, checkpoints, loggers, ledger).
      options: the suite's options, ``kind`` included (as under ``suites.<name>``).
      name: the suite's name: the result's `suite`, the trackers' key segment.
    """

    def __init__(self, config: Any, options: Mapping[str, Any], *, name: str = SUITE_NAME) -> None:
        from tracker_eval.runners.pipeline import Pipeline  # noqa: PLC0415
        from tracker_eval.runners.stream import PrimaryStream  # noqa: PLC0415

        cls = suite_class(str(options.get("kind", "")))
        suite_options = {k: v for k, v in options.items() if k != "kind"}
        self.name = name
        self.pipeline = Pipeline(config, progress=False)
        self.suite = cls(cls.Config.from_mapping(suite_options, where=f"suites.{name}"),
                         adapter=self.pipeline.adapter, mesh=self.pipeline.mesh, name=name,
                         output_dir=config.output_dir)
        self.stream = PrimaryStream.open(config)

    def evaluate(self, step: int) -> Any:
        """Scores one checkpoint and records it; returns the `EvalResult`, or None when another
        process holds the step or it is already stored.

        Raises:
          Exception: whatever restoring or the suite raised (the step is marked failed first).
        """
        from tracker_eval.evaluation.result import EvalResult  # noqa: PLC0415

        ledger, owner = self.stream.ledger, self.stream.owner
        if not ledger.claim(step, owner=owner, ttl_s=600.0):
            return None
        try:
            start = time.perf_counter()
            params = self.pipeline.restore(step).params
            restore_s = time.perf_counter() - start
            scored = self.suite.run(params, step=step)
        except Exception as error:
            ledger.mark_failed(step, one_line(error, limit=300), owner=owner)
            raise
        result = EvalResult(step=step, checkpoint=self.pipeline.checkpoint_path(step), metrics=scored.metrics,
                            samples=scored.samples, suite=self.name,
                            provenance=self.pipeline.provenance(restore_s=round(restore_s, 4), **scored.provenance))
        return result if self.stream.record(result) else None

    def close(self, *, drain_s: float = 60.0) -> bool:
        """Delivers what is left (up to `drain_s`), closes the loggers and the suite; True when all was delivered."""
        try:
            return self.stream.close(drain_s=drain_s, close_timeout_s=30.0)
        finally:
            self.suite.close()


def run_harness_demo(
    *, output_dir: str, steps: int | None, wandb: bool, mlflow: bool, tensorboard: bool, limit: int | None = None,
) -> int:
    """Trains the byte LM and scores each checkpoint with the harness as it appears; returns the exit code."""
    from tracker_eval.demo.run import fresh_dir  # noqa: PLC0415

    steps = steps or DEFAULT_STEPS
    if steps < SAVE_EVERY:
        raise ConfigError(f"--steps {steps} is below the checkpoint interval {SAVE_EVERY}; use --steps {SAVE_EVERY} "
                          "or more")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1 (documents per task)")
    suite_class(SUITE["kind"])  # fails before anything is written when the plug-in is missing
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-task progress bars, one set per checkpoint
    output_dir = os.path.abspath(output_dir)
    fresh_dir(output_dir)
    config_path = os.path.join(output_dir, "demo.yaml")
    options = {**SUITE, "limit": limit or DEFAULT_LIMIT}
    with open(config_path, "w") as f:
        yaml.safe_dump(harness_demo_config(output_dir, steps=steps, wandb=wandb, mlflow=mlflow,
                                           tensorboard=tensorboard), f, sort_keys=False)
    with open(os.path.join(output_dir, "suite.yaml"), "w") as f:  # the future `suites:` entry, for reference
        yaml.safe_dump({"suites": {SUITE_NAME: options}}, f, sort_keys=False)
    print(f"tracker-eval demo --harness: training the byte-level LM on Python's pydoc topics for {steps} steps, "
          f"a checkpoint every {SAVE_EVERY}; each is scored on the held-out pydoc tasks ({options['limit']} "
          f"documents each).\n  output: {output_dir}", flush=True)

    from tracker_eval.checkpoints.listing import finalized_steps  # noqa: PLC0415
    from tracker_eval.config import load_config  # noqa: PLC0415

    config = load_config(config_path)
    evaluation = HarnessEvaluation(config, options)
    command = [sys.executable, "-m", "tracker_eval.demo.train", "--task", "language_model", "--checkpoint-dir",
               config.checkpoint_dir, "--steps", str(steps), "--save-every", str(SAVE_EVERY)]
    trainer = subprocess.Popen(command, env={k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"})
    start, done, failed = time.monotonic(), set(), False
    try:
        while True:
            finished = trainer.poll() is not None  # read before listing: a last save is then seen
            new = [s for s in finalized_steps(config.checkpoint_dir) if s not in done]
            for step in new:
                done.add(step)
                try:
                    result = evaluation.evaluate(step)
                except Exception as error:  # noqa: BLE001 - a failing checkpoint never stops the others
                    failed = True
                    print(f"tracker-eval: harness: step {step} failed: {one_line(error, limit=300)}", file=sys.stderr)
                    continue
                if result is not None:
                    scores = (f"{n} {result.metrics[n]:.4f}" for n in HEADLINE if n in result.metrics)
                    print(f"harness: step {step:>4}  " + "  ".join(scores), flush=True)
            if finished and not new:
                break
            if not new:
                time.sleep(config.watch.poll_interval_s)
    finally:
        if trainer.poll() is None:
            trainer.terminate()
        trainer.wait(timeout=60)
        delivered = evaluation.close()
    if trainer.returncode != 0:
        print(f"tracker-eval demo: the training process failed (exit {trainer.returncode})", file=sys.stderr)
        return 1
    _summary(config, config_path, seconds=time.monotonic() - start, delivered=delivered)
    return 1 if failed else 0


def _summary(config: Any, config_path: str, *, seconds: float, delivered: bool) -> None:
    from tracker_eval.demo.plot import plot_metrics  # noqa: PLC0415
    from tracker_eval.demo.run import browse_lines  # noqa: PLC0415
    from tracker_eval.runners.status import collect_status  # noqa: PLC0415

    doc = collect_status(config)
    steps = [{**s, "metrics": {k: v for k, v in s["metrics"].items() if k in HEADLINE}} for s in doc["steps"]]
    plot = plot_metrics(steps, os.path.join(config.output_dir, "harness_metrics.png"),
                        title="tracker-eval demo: byte LM, LM Evaluation Harness on held-out pydoc text")
    header = ["step", *HEADLINE]
    table = [header] + [[str(s["step"]), *(_cell(s["metrics"].get(n)) for n in HEADLINE)] for s in steps]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["", f"tracker-eval demo --harness finished in {seconds:.0f} s. Harness scores per checkpoint "
             f"(suite {SUITE_NAME}):", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    if not delivered:
        lines.append("\nsome results are not delivered yet; `tracker-eval status --config FILE` shows which")
    lines += ["", f"plot:            {plot}",
              f"samples (JSONL): {os.path.join(config.output_dir, 'metrics.samples', SUITE_NAME)}", ""]
    lines += browse_lines(config, config_path)
    print("\n".join(lines), flush=True)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
