"""What both demos share: their loggers, a fresh output directory, training beside a watcher, browsing.

    fresh_dir(output_dir)                     # only a previous demo's directory is ever removed
    code = watch_beside_training(config, command=training_command(ckpts, steps=200, save_every=20),
                                 summary=lambda seconds: print(seconds))

`run` (the classifier demo) and `harness` (`--harness`) both build on this module; it imports
neither, so the demo's imports run one way: run -> harness -> beside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tracker_eval.errors import ConfigError

_MARKER = ".tracker-eval-demo"


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
