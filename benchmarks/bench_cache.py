"""One checkpoint's evaluation with the eval set cached against reading it again, when preparing
the data costs as much as evaluating it.

The data factory builds each batch from the raw text with Python-level work (a tokenizer stand-in:
it holds the interpreter like most input pipelines written in Python), calibrated so that reading
the whole set alone takes as long as the evaluation step over it alone. Three `Pipeline`s differ
only in `cache` (none, host, device); each evaluates the same live params (no restore) after one
warm-up evaluation that compiles and, where cached, records. Medians over interleaved repeats;
8 fake CPU devices (`make bench` sets XLA_FLAGS).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np

from tracker_eval.config import EvalConfig, MeshConfig
from tracker_eval.evaluation.sharding import place_params
from tracker_eval.evaluation.state import EvalState
from tracker_eval.runners.pipeline import Components, Pipeline
from tracker_eval.tasks import language_model as lm

BATCH, SEQ, BATCHES, REPEATS = 64, 128, 40, 7


def tokenized_data(*, split: str, batch_size: int, process_index: int = 0, process_count: int = 1,
                   rounds: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The language-model batches, each token looked up in Python `rounds` times (the cost knob)."""
    del process_index, process_count  # single process here
    text = lm.corpus()
    table = list(range(256))
    window = SEQ + 1
    start = int(len(text) * 0.9)
    for b in range(BATCHES):
        rows = []
        for r in range(batch_size):
            offset = start + ((b * batch_size + r) * SEQ) % (len(text) - start - window)
            chunk = text[offset:offset + window]
            for _ in range(rounds):
                ids = [table[byte] for byte in chunk]
            rows.append(ids)
        tokens = np.asarray(rows, np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((batch_size, SEQ), bool)}


def _pipeline(cache: str, rounds: int) -> Pipeline:
    config = EvalConfig(checkpoint_dir="unused", model="lm", eval_function="lm", data="tokenized", batch_size=BATCH,
                        mesh=MeshConfig(data=-1), data_kwargs={"rounds": rounds}, cache=cache, loggers=())
    components = Components(model_factory=lm.make_model, eval_function=lm.eval_function,
                            data_factory=tokenized_data, finalize=lm.finalize)
    return Pipeline(config, components=components, progress=False)


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _calibrate(step_s: float) -> int:
    """Rounds of Python work per token so that reading the set alone takes `step_s`."""
    one = _median_s(lambda: list(tokenized_data(split="validation", batch_size=BATCH, rounds=1)), 3)
    rounds = max(1, round(step_s / one))
    for _ in range(2):  # the cost is not quite linear in rounds (fixed per-batch work)
        took = _median_s(lambda r=rounds: list(tokenized_data(split="validation", batch_size=BATCH, rounds=r)), 3)
        rounds = max(1, round(rounds * step_s / took))
    return rounds


def run() -> dict[str, float]:
    pipelines = {"host": _pipeline("host", 1)}
    model = lm.make_model()
    params = place_params(lm.init_params(model, seq_len=SEQ), pipelines["host"].mesh, rule="replicated")
    state = EvalState.create(apply_fn=None, params=params)

    def evaluate(pipeline: Pipeline) -> Callable[[], object]:
        return lambda: pipeline.evaluate_state(state, checkpoint="bench")

    evaluate(pipelines["host"])()  # compiles and records the cheap set: later calls are the step alone
    step_s = _median_s(evaluate(pipelines["host"]), 3)
    rounds = _calibrate(step_s)
    data_s = _median_s(lambda: list(tokenized_data(split="validation", batch_size=BATCH, rounds=rounds)), 3)
    pipelines = {mode: _pipeline(mode, rounds) for mode in ("none", "host", "device")}
    for pipeline in pipelines.values():
        evaluate(pipeline)()  # compile; record where cached
    times: dict[str, list[float]] = {mode: [] for mode in pipelines}
    for _ in range(REPEATS):
        for mode, pipeline in pipelines.items():
            times[mode].append(_median_s(evaluate(pipeline), 1))
    med = {mode: statistics.median(v) for mode, v in times.items()}
    for mode, pipeline in pipelines.items():
        assert pipeline.cache.holds(pipeline.evaluation.placer) == (mode != "none"), mode
    print(f"  {BATCHES} batches of {BATCH}x{SEQ}: step alone {step_s:.3f} s, data alone {data_s:.3f} s "
          f"({rounds} rounds); median eval s: " + ", ".join(f"{k}={v:.3f}" for k, v in med.items()))
    return {
        "eval_cached_vs_uncached_ratio": med["none"] / med["host"],
        "eval_cached_vs_uncached_device": med["none"] / med["device"],
        "cache_bench_data_vs_step_ratio": data_s / step_s,
    }
