"""TensorBoard logger costs: start-up with a long history, one in-order step, one late step.

A (re)started logger reads the run's event file once to learn which steps it holds (exactly-once
delivery). The figure that matters is how that grows with the history: start-up with 300 held
checkpoints against none, and against TensorBoard's own reader (a fresh ``EventAccumulator``, what
``tensorboard --load_fast=false`` does per run) on the same files. Each checkpoint carries two
scalars and a 30-bucket histogram of 400 per-example values, like the demo's.

    python -m benchmarks tensorboard
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import LoggerContext


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _result(step: int, rng: np.random.Generator) -> EvalResult:
    losses = rng.gamma(2.0, 0.5, size=400).astype(np.float32)
    return EvalResult(step=step, checkpoint=f"/bench/{step}", metrics={"loss": float(losses.mean()), "accuracy": 0.5},
                      per_example={"loss": losses})


def run(*, held: int = 300, repeats: int = 7) -> dict[str, float]:
    """Measures the logger's start-up with ``held`` steps vs none, and one in-order and one late step.

    Returns:
      Medians in seconds, and ``tensorboard_startup_vs_reader_ratio``: start-up with ``held`` steps
      divided by a fresh ``EventAccumulator`` reading the same run.
    """
    from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
    from tracker_eval_tensorboard.logger import TensorboardConfig, TensorboardLogger  # noqa: PLC0415

    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp(prefix="tracker-eval-bench-tensorboard-")
    config = TensorboardConfig(run_name="eval")
    empty = LoggerContext(output_dir=f"{root}/empty", run_key="empty")
    context = LoggerContext(output_dir=f"{root}/long", run_key="long")
    logger = TensorboardLogger(config, context=context)
    append_times = []
    for i in range(1, held + 1):
        logger.log_result(_result(100 * i, rng))
        start = time.perf_counter()
        logger.flush()
        append_times.append(time.perf_counter() - start)
    startup_none = _median_s(lambda: TensorboardLogger(config, context=empty), repeats)
    startup_held = _median_s(lambda: TensorboardLogger(config, context=context), repeats)
    reader = _median_s(lambda: event_accumulator.EventAccumulator(str(logger.run_dir)).Reload(), repeats)
    late_times = []
    for i in range(repeats):  # each a step below every held one: a new generation of the whole run
        logger.log_result(_result(50 - i, rng))
        start = time.perf_counter()
        logger.flush()
        late_times.append(time.perf_counter() - start)
    return {
        "tensorboard_startup_s_no_history": startup_none,
        f"tensorboard_startup_s_{held}_steps": startup_held,
        "tensorboard_startup_vs_reader_ratio": startup_held / reader,
        "tensorboard_append_step_s": statistics.median(append_times),
        f"tensorboard_late_step_s_{held}_steps": statistics.median(late_times),
    }
