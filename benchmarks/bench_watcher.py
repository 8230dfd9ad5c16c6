"""Watcher benchmark: how soon a finalized checkpoint is picked up, and what one poll costs.

Detection latency is the time from the rename that finalizes a checkpoint (what Orbax does on a
local disk) to the watcher's "evaluating step N" line, stamped as it arrives on the pipe of a real
`tracker-eval watch` subprocess; the median over 20 checkpoints, each published while the watcher
is idle at a random point of its poll cycle. Once with polling only (`fast_path: false`,
`poll_interval_s: 1`), once with the inotify fast path. A poll is `finalized_steps` plus
`Ledger.register` with 1,000 finalized step directories present (empty directories: listing cost
does not depend on their contents). Target: fast path < 0.5 s.

    python -m benchmarks watcher
    run()   # {"detect_latency_poll_s": ..., "detect_latency_fast_s": ..., "poll_cost_1000_s": ...}
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CHECKPOINTS = 20
POLL_INTERVAL_S = 1.0
FAKE_STEPS = 1000
POLL_REPEATS = 20


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return env


def _config(root: pathlib.Path, *, fast_path: bool) -> pathlib.Path:
    config = {
        "checkpoint_dir": str(root / "ckpts"),
        "model": "tracker_eval.tasks.classification:make_model",
        "eval_function": "tracker_eval.tasks.classification:eval_function",
        "data": "tracker_eval.tasks.classification:make_eval_data",
        "data_kwargs": {"limit": 64},  # detection is measured, not evaluation: keep it short
        "batch_size": 64,
        "output_dir": str(root / "out"),
        "loggers": [{"type": "jsonl"}],
        "watch": {"poll_interval_s": POLL_INTERVAL_S, "fast_path": fast_path, "idle_timeout_s": 600},
    }
    path = root / "watch.yaml"
    path.write_text(json.dumps(config))
    return path


def _publish(source: pathlib.Path, checkpoint_dir: pathlib.Path, step: int) -> float:
    """Writes a copy under Orbax's temporary name, then finalizes it by rename; returns the rename time."""
    tmp = checkpoint_dir / f"{step}.orbax-checkpoint-tmp"
    shutil.copytree(source, tmp)
    os.rename(tmp, checkpoint_dir / str(step))
    return time.time()


class _Lines:
    """A subprocess's output lines, each stamped with its arrival time."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.items: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._cond:
                self.items.append((time.time(), line))
                self._cond.notify_all()

    def wait(self, pattern: str, timeout: float) -> float:
        """Arrival time of the first line matching `pattern`; raises RuntimeError after `timeout`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for stamp, line in self.items:
                    if regex.search(line):
                        return stamp
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "".join(line for _, line in self.items[-20:])
                    raise RuntimeError(f"no line matching {pattern!r} within {timeout:g} s; output:\n{tail}")
                self._cond.wait(left)


def detection_latency(source: pathlib.Path, *, fast_path: bool, seed: int = 0) -> list[float]:
    """Per-checkpoint seconds from the finalizing rename to the watcher starting its evaluation."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-watcher-") as tmp:
        root = pathlib.Path(tmp)
        (root / "ckpts").mkdir()
        config = _config(root, fast_path=fast_path)
        exe = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
        process = subprocess.Popen([exe, "watch", "--config", str(config)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=_child_env(), start_new_session=True)
        try:
            lines = _Lines(process)
            lines.wait(r"watching ", timeout=120)
            latencies = []
            for step in range(1, CHECKPOINTS + 1):
                # Publish at a random point of the poll cycle, with the watcher idle.
                time.sleep(rng.uniform(0.0, POLL_INTERVAL_S))
                renamed = _publish(source, root / "ckpts", step)
                started = lines.wait(rf"evaluating step {step}$", timeout=60)
                latencies.append(started - renamed)
                lines.wait(rf"step {step} evaluated", timeout=120)
            return latencies
        finally:
            process.kill()
            process.wait(timeout=30)


def poll_cost(*, steps: int = FAKE_STEPS, repeats: int = POLL_REPEATS) -> tuple[float, float]:
    """(median seconds of a steady-state poll, seconds of the first poll that registers every step)."""
    from tracker_eval.checkpoints.listing import finalized_steps  # noqa: PLC0415
    from tracker_eval.ledger.steps import Ledger  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-poll-") as tmp:
        root = pathlib.Path(tmp)
        for step in range(1, steps + 1):
            (root / "ckpts" / str(step * 100)).mkdir(parents=True)
        (root / "ckpts" / f"{(steps + 1) * 100}.orbax-checkpoint-tmp").mkdir()
        with Ledger(root / "out", checkpoint_dir=root / "ckpts", config_hash="bench", loggers=["jsonl"]) as ledger:
            start = time.perf_counter()
            listed = finalized_steps(root / "ckpts")
            added = ledger.register(listed)
            first = time.perf_counter() - start
            assert len(listed) == steps and len(added) == steps, (len(listed), len(added))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                ledger.register(finalized_steps(root / "ckpts"))
                times.append(time.perf_counter() - start)
    return statistics.median(times), first


def run() -> dict[str, float]:
    """Median detection latency (polling, fast path) and the cost of one poll over 1,000 checkpoints."""
    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-source-") as tmp:
        train_classifier(pathlib.Path(tmp) / "ckpts", steps=1, save_every=1)
        source = pathlib.Path(tmp) / "ckpts" / "1"
        poll = detection_latency(source, fast_path=False)
        fast = detection_latency(source, fast_path=True)
    steady, first = poll_cost()
    return {
        "detect_latency_poll_s": statistics.median(poll),
        "detect_latency_poll_max_s": max(poll),
        "detect_latency_fast_s": statistics.median(fast),
        "detect_latency_fast_max_s": max(fast),
        "poll_cost_1000_s": steady,
        "poll_first_register_1000_s": first,
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<30} {value:.4f}")
