"""Compare benchmark: does `tracker-eval compare` cost more on a long run?

Two ledgers written the way the watcher writes them (`Ledger.record_metrics`: exact JSON, a `.npz`
of per-example values per step): one with 1,000 evaluated steps, one with 2, each step with the same
20,000 examples (`example_loss`, `example_accuracy`). The timed work is what `tracker-eval compare`
does after loading its config: read the two steps' stored results from the ledger and compute every
figure. Medians over 31 repeats of each, alternating (a repeat takes milliseconds, so a busy
machine moves single repeats by several times; the medians hold).

    python -m benchmarks compare
    run()   # {"compare_cost_ratio": ..., "compare_long_run_ms": ..., "compare_short_run_ms": ...}

Target: compare_cost_ratio <= 1.2.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import tempfile
import time

import numpy as np

LONG, SHORT, EXAMPLES, REPEATS = 1000, 2, 20_000, 31


def _ledger(root: pathlib.Path, steps: int) -> object:
    """A run of `steps` stored results; returns its loaded config."""
    from tracker_eval.config import load_config
    from tracker_eval.evaluation.result import EvalResult
    from tracker_eval.identity import stream_hash
    from tracker_eval.ledger.steps import Ledger

    (root / "ckpts").mkdir(parents=True)
    path = root / "watch.yaml"
    path.write_text(json.dumps({
        "checkpoint_dir": str(root / "ckpts"), "output_dir": str(root / "out"),
        "model": "tracker_eval.tasks.classification:make_model",
        "eval_function": "tracker_eval.tasks.classification:eval_function",
        "data": "tracker_eval.tasks.classification:make_eval_data", "batch_size": 64,
        "loggers": [{"type": "jsonl"}]}))
    config = load_config(path)
    rng = np.random.default_rng(0)
    with Ledger(config.output_dir, checkpoint_dir=config.checkpoint_dir, config_hash=stream_hash(config),
                loggers=["jsonl"]) as ledger:
        for step in range(1, steps + 1):
            loss = rng.gamma(2.0, 0.3, EXAMPLES).astype(np.float32)
            correct = (rng.random(EXAMPLES) < 0.8).astype(np.float32)
            assert ledger.claim(step, owner="bench")
            metrics = {"loss": float(loss.mean()), "accuracy": float(correct.mean())}
            ledger.record_metrics(EvalResult(step=step, checkpoint=str(step), metrics=metrics,
                                             per_example={"example_loss": loss, "example_accuracy": correct}),
                                  owner="bench")
    return config


def _compare_once(config: object, a: int, b: int) -> float:
    from tracker_eval.runners.compare import compare_results, stored_results

    start = time.perf_counter()
    results = stored_results(config, "", [a, b])
    found = compare_results(results[a], results[b], suite="")
    elapsed = time.perf_counter() - start
    assert len(found) == 2
    return elapsed


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        long_run = _ledger(pathlib.Path(tmp) / "long", LONG)
        short_run = _ledger(pathlib.Path(tmp) / "short", SHORT)
        _compare_once(long_run, 1, LONG), _compare_once(short_run, 1, SHORT)  # warm imports and caches
        long_times, short_times = [], []
        for _ in range(REPEATS):
            long_times.append(_compare_once(long_run, LONG // 2, LONG))  # two steps in the middle and at the end
            short_times.append(_compare_once(short_run, 1, SHORT))
    long_s, short_s = statistics.median(long_times), statistics.median(short_times)
    return {"compare_cost_ratio": long_s / short_s, "compare_long_run_ms": 1000 * long_s,
            "compare_short_run_ms": 1000 * short_s}
