"""Schedule benchmark: how soon the newest checkpoint is delivered when the watcher starts behind.

A backlog of 20 finalized steps is present when a real `tracker-eval watch` subprocess starts; the
figure is the time from its "watching" line to the newest step's line in the JSONL tracker file,
with `watch.order: newest_first` divided by the same with `oldest_first` (medians of 3 runs each,
alternating, in one process on one machine). `newest_first_stored_latency` is the same ratio up to
the newest step's "evaluated" line (its result is recorded in the ledger right after).

Each evaluation is the digits classifier on 256 examples whose four batches arrive 0.25 s apart
(`slow_data`, cache off): about a second a step, so the backlog lasts ~20 s. Delivery yields to a
running evaluation for at most min(20 s, `watch.delivery_deadline_s` / 3) (see
`tracker_eval.evaluation.activity`), so while the backlog is evaluated back to back the newest
result waits in the outbox up to that bound: the delivered figure includes it.

    python -m benchmarks schedule
    run()   # {"newest_first_latency": ratio, "newest_first_stored_latency": ratio, ...}
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.bench_watcher import _child_env, _Lines, _publish

BACKLOG = 20
REPEATS = 3
BATCH_DELAY_S = 0.25
ROOT = pathlib.Path(__file__).resolve().parents[1]


def slow_data(*, split: str, batch_size: int, process_index: int = 0, process_count: int = 1,
              limit: int = 256) -> Iterator[dict[str, Any]]:
    """The digits eval data, each batch handed out `BATCH_DELAY_S` late (a step costs ~1 s)."""
    from tracker_eval.tasks.classification import make_eval_data  # noqa: PLC0415 - watcher-side import

    for batch in make_eval_data(split=split, batch_size=batch_size, process_index=process_index,
                                process_count=process_count, limit=limit):
        time.sleep(BATCH_DELAY_S)
        yield batch


def _config(root: pathlib.Path, *, order: str) -> pathlib.Path:
    config = {
        "checkpoint_dir": str(root / "ckpts"),
        "model": "tracker_eval.tasks.classification:make_model",
        "eval_function": "tracker_eval.tasks.classification:eval_function",
        "data": "benchmarks.bench_schedule:slow_data",
        "batch_size": 64,
        "cache": "none",
        "output_dir": str(root / "out"),
        "loggers": [{"type": "jsonl"}],
        "watch": {"poll_interval_s": 1.0, "order": order, "idle_timeout_s": 600},
    }
    path = root / "watch.yaml"
    path.write_text(json.dumps(config))
    return path


def _newest_delivered(jsonl: pathlib.Path, step: int) -> bool:
    if not jsonl.exists():
        return False
    return any(json.loads(line).get("step") == step for line in jsonl.read_text().splitlines() if line.strip())


def newest_latency(source: pathlib.Path, *, order: str) -> tuple[float, float]:
    """Seconds from the watcher's start line to the newest backlog step's result: (stored, in the JSONL file)."""
    with tempfile.TemporaryDirectory(prefix="bench-schedule-") as tmp:
        root = pathlib.Path(tmp)
        (root / "ckpts").mkdir()
        for step in range(1, BACKLOG + 1):
            _publish(source, root / "ckpts", step * 100)
        config = _config(root, order=order)
        exe = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
        env = _child_env()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        process = subprocess.Popen([exe, "watch", "--config", str(config)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        try:
            lines = _Lines(process)
            started = lines.wait(r"watching ", timeout=120)
            deadline = time.monotonic() + 600
            while not _newest_delivered(root / "out" / "metrics.jsonl", BACKLOG * 100):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"step {BACKLOG * 100} not delivered (watcher exit code {process.poll()})")
                time.sleep(0.02)
            delivered = time.time()
            stored = lines.wait(rf"step {BACKLOG * 100} evaluated in", timeout=10)
            return stored - started, delivered - started
        finally:
            process.kill()
            process.wait(timeout=30)


def run() -> dict[str, float]:
    """Median time to the newest step's delivery under each order, and their ratio."""
    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    times: dict[str, list[tuple[float, float]]] = {"newest_first": [], "oldest_first": []}
    with tempfile.TemporaryDirectory(prefix="bench-source-") as tmp:
        train_classifier(pathlib.Path(tmp) / "ckpts", steps=1, save_every=1)
        source = pathlib.Path(tmp) / "ckpts" / "1"
        for _ in range(REPEATS):
            for order in times:
                times[order].append(newest_latency(source, order=order))
        shutil.rmtree(pathlib.Path(tmp) / "ckpts", ignore_errors=True)
    figures = {}
    for i, what in enumerate(("stored", "delivered")):
        newest = statistics.median(t[i] for t in times["newest_first"])
        oldest = statistics.median(t[i] for t in times["oldest_first"])
        figures[f"newest_first_{what}_s"], figures[f"oldest_first_{what}_s"] = newest, oldest
        figures["newest_first_latency" if what == "delivered" else "newest_first_stored_latency"] = newest / oldest
    return figures


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<30} {value:.4f}")
