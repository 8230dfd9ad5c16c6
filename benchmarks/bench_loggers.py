"""Slow-tracker benchmark: evaluation wall time with every logger on (MLflow answering 2 s late) vs off.

The evaluation never waits on trackers: results go to `FanOut.submit`, which returns at once. The
figure is the ratio of the two wall times (target <= 1.05). The workload is the real
`ExtendedEvaluation` of the tiny language model (60 batches of 64x128 tokens per evaluation);
`matmul_workload` is a stand-in kept for isolating the loggers' cost.

    python -m benchmarks loggers
    run(workload=my_eval_fn)   # my_eval_fn(step) -> EvalResult
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import LoggerContext
from tracker_eval.loggers.fanout import FanOut
from tracker_eval.loggers.registry import build_loggers

Workload = Callable[[int], EvalResult]


def matmul_workload(*, seconds: float = 1.0, size: int = 384) -> Workload:
    """A stand-in evaluation: a jitted matmul loop calibrated to take about ``seconds``."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chain(x: jax.Array, n: int) -> jax.Array:
        return jax.lax.fori_loop(0, n, lambda _, y: jnp.tanh(y @ x), x)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), dtype=np.float32) / np.sqrt(size))
    chain(x, 10).block_until_ready()
    start = time.perf_counter()
    chain(x, 50).block_until_ready()
    iterations = max(1, int(50 * seconds / (time.perf_counter() - start)))

    def evaluate(step: int) -> EvalResult:
        y = jax.device_get(chain(x, iterations))
        per_example = np.abs(y[:, 0]).astype(np.float64)
        return EvalResult(step=step, checkpoint=f"/bench/{step}", metrics={"loss": float(per_example.mean())},
                          per_example={"loss": per_example})

    return evaluate


def evaluator_workload() -> Workload:
    """The real thing: `ExtendedEvaluation` of the tiny language model over 60 host batches."""
    import jax  # noqa: PLC0415

    from benchmarks.bench_eval import BATCH, SEQ, _batches  # noqa: PLC0415
    from tracker_eval.config import MeshConfig  # noqa: PLC0415
    from tracker_eval.evaluation.evaluator import ExtendedEvaluation  # noqa: PLC0415
    from tracker_eval.evaluation.sharding import make_mesh  # noqa: PLC0415
    from tracker_eval.evaluation.state import EvalState  # noqa: PLC0415
    from tracker_eval.tasks import language_model as lm  # noqa: PLC0415

    model = lm.make_model()
    params = lm.init_params(model, seq_len=SEQ)
    batches = _batches()
    evaluation = ExtendedEvaluation(model=model, mesh=make_mesh(MeshConfig(data=-1)), batch_size=BATCH,
                                    eval_function=lm.eval_function, finalize_fn=lm.finalize, progress=False)
    state = EvalState.create(apply_fn=model.apply, params=params, rng=jax.random.key(0))
    evaluation.evaluate(state, batches)  # compile outside the measurement

    def evaluate(step: int) -> EvalResult:
        return evaluation.evaluate(state.replace(step=step), batches, checkpoint=f"/bench/{step}")

    return evaluate


def _run_evaluations(workload: Workload, steps: list[int], fanout: FanOut | None) -> float:
    start = time.perf_counter()
    for step in steps:
        result = workload(step)
        if fanout is not None:
            fanout.submit(result, flush=True)  # log + flush per result, as the watcher's delivery does
    return time.perf_counter() - start


def run(
    workload: Workload | None = None,
    *,
    evaluations: int = 5,
    repeats: int = 3,
    delay_s: float = 2.0,
    logger_types: tuple[str, ...] = ("console", "jsonl", "wandb", "mlflow"),
) -> dict[str, float]:
    """Measures evaluation wall time with loggers on (slow MLflow) vs off.

    Args:
      workload: ``workload(step) -> EvalResult``; default the real evaluator (`evaluator_workload`).
      evaluations: evaluations per measured loop.
      repeats: on/off pairs, interleaved; medians are reported.
      delay_s: added latency of every MLflow request (through a loopback proxy).
      logger_types: which loggers are on (for finding the cost of one).

    Returns:
      ``slow_tracker_overhead_ratio`` (on / off), the two median wall times, the loggers'
      one-off start-up (before the first evaluation) and how long the trackers took to drain
      after the evaluations ended.
    """
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from fixtures_mlflow import MlflowServer
    from slow_proxy import SlowProxy

    workload = workload or evaluator_workload()
    root = tempfile.mkdtemp(prefix="tracker-eval-bench-loggers-")
    server = MlflowServer(os.path.join(root, "mlflow")).start()
    proxy = SlowProxy(server.url, delay_s=delay_s).start()
    on_times, off_times, drain_times, startup_times = [], [], [], []
    try:
        for repeat in range(repeats):
            steps = [1000 * repeat + 100 * i for i in range(evaluations)]
            if repeat % 2 == 0:  # alternate the order so warm-up and drift hit both sides
                off_times.append(_run_evaluations(workload, steps, None))
            context = LoggerContext(output_dir=os.path.join(root, f"out{repeat}"), run_key=f"bench-{repeat}")
            specs = [
                {"type": "console", "stream": "stderr"},
                {"type": "jsonl"},
                {"type": "wandb", "mode": "offline"},
                {"type": "mlflow", "tracking_uri": proxy.url, "timeout_s": 30},
            ]
            specs = [spec for spec in specs if spec["type"] in logger_types]
            fanout = FanOut(build_loggers(specs, context), deadline_s=120)
            # Start-up (imports, run creation) happens once per process, before the first evaluation.
            startup_start = time.perf_counter()
            fanout.log_config({"benchmark": "slow_tracker", "evaluations": evaluations})
            started = fanout.wait(timeout=120)
            startup_times.append(time.perf_counter() - startup_start)
            with contextlib.redirect_stderr(io.StringIO()):
                on_times.append(_run_evaluations(workload, steps, fanout))
                drain_start = time.perf_counter()
                outcomes = fanout.flush(timeout=300)
                fanout.close(timeout=60)
            drain_times.append(time.perf_counter() - drain_start)
            if repeat % 2 == 1:
                off_times.append(_run_evaluations(workload, steps, None))
            failed = {name: str(e) for name, e in {**started, **outcomes}.items() if e is not None}
            if failed:
                raise RuntimeError(f"loggers failed during the benchmark: {failed}")
    finally:
        proxy.stop()
        server.stop()
    on, off = statistics.median(on_times), statistics.median(off_times)
    return {
        "slow_tracker_overhead_ratio": on / off,
        "slow_tracker_eval_s_loggers_on": on,
        "slow_tracker_eval_s_loggers_off": off,
        "slow_tracker_drain_s": statistics.median(drain_times),
        "slow_tracker_startup_s": statistics.median(startup_times),
    }
