"""Three suites on one checkpoint: their cost next to its bound, and next to three separate runs.

`suites_vs_bound_ratio`: one checkpoint evaluated by a `Pipeline` with three suites (one restore,
then each suite's compiled step over its cached data) divided by the bound: one bare params-only
restore plus the three bare eval loops (`ExtendedEvaluation.evaluate` on the restored state, data
already cached), measured in the same process. Medians over interleaved repeats, warm (compiled).

`suites_vs_separate_ratio`: a fresh run of the three suites (build, one restore, three compiles)
divided by three fresh single-suite runs of the same checkpoint (each builds, restores, compiles):
what a user saves by moving three watchers into one config.

A real Orbax checkpoint of the byte-level language model (tracker_eval.tasks.language_model, width
128); the three suites read its held-out text of two corpora; 8 fake CPU devices (`make bench` sets
XLA_FLAGS).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tracker_eval.config import load_config
from tracker_eval.runners.pipeline import Pipeline

REPEATS = 7
TASK = "tracker_eval.tasks.language_model"
WIDTH = 128
SUITES = {
    "digits_text": {"batch_size": 64, "data_kwargs": {"corpus": "sklearn"}},
    "pydoc": {"batch_size": 64, "data_kwargs": {"corpus": "pydoc"}},
    "pydoc_long": {"batch_size": 32, "data_kwargs": {"corpus": "pydoc", "seq_len": 256}},
}
STEP = 2


def _config(root: pathlib.Path, suites: dict[str, dict[str, Any]]) -> Any:
    spec = {name: {"eval_function": f"{TASK}:eval_function", "data": f"{TASK}:make_eval_data",
                   "finalize": f"{TASK}:finalize", **options} for name, options in suites.items()}
    path = root / f"{'-'.join(suites)}.yaml"
    path.write_text(json.dumps({"checkpoint_dir": str(root / "ckpts"), "model": f"{TASK}:make_model",
                                "model_kwargs": {"width": WIDTH}, "output_dir": str(root / "out"), "loggers": [],
                                "suites": spec}))
    return load_config(path)


def _legacy(config: Any, name: str) -> Any:
    """The one suite `name` as a config without suites (what a separate watcher would run)."""
    return dataclasses.replace(config.for_suite(name), suites=())


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run() -> dict[str, float]:
    from tracker_eval.tasks.train import train_language_model  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-suites-") as tmp:
        root = pathlib.Path(tmp)
        train_language_model(root / "ckpts", steps=STEP, save_every=STEP, width=WIDTH)
        config = _config(root, SUITES)

        # Cold: one run of three suites against three single-suite runs, each from nothing.
        def together() -> None:
            Pipeline(config, progress=False).evaluate_suites(STEP)

        def separate() -> None:
            for name in SUITES:
                Pipeline(_legacy(config, name), progress=False).evaluate_step(STEP)

        cold = {"together": [], "separate": []}
        for _ in range(3):
            cold["together"].append(_timed(together))
            cold["separate"].append(_timed(separate))

        # Warm: the same pipeline evaluating the checkpoint again, against its bound.
        pipeline = Pipeline(config, progress=False)
        outcomes = pipeline.evaluate_suites(STEP)  # compiles each suite and fills each cache
        assert not any(isinstance(o, Exception) for o in outcomes.values()), outcomes
        state = pipeline.restore(STEP)
        for suite in pipeline.suites.values():
            suite.evaluation.evaluate(state, suite.data())

        def bound() -> None:
            restored = pipeline.restore(STEP)
            for suite in pipeline.suites.values():
                suite.evaluation.evaluate(restored, suite.data())

        warm = {"suites": [], "bound": [], "restore": []}
        for _ in range(REPEATS):
            warm["suites"].append(_timed(lambda: pipeline.evaluate_suites(STEP)))
            warm["bound"].append(_timed(bound))
            warm["restore"].append(_timed(lambda: pipeline.restore(STEP)))
        med = {k: statistics.median(v) for k, v in {**cold, **warm}.items()}
        compiles = {name: suite.evaluation.trace_count for name, suite in pipeline.suites.items()}
        assert set(compiles.values()) == {1}, compiles
    print(f"  3 suites on one checkpoint: {med['suites']:.3f} s vs bound {med['bound']:.3f} s (restore "
          f"{med['restore']:.3f} s); fresh: together {med['together']:.2f} s vs separate {med['separate']:.2f} s")
    return {
        "suites_vs_bound_ratio": med["suites"] / med["bound"],
        "suites_vs_separate_ratio": med["together"] / med["separate"],
        "suites_restore_share_of_bound": med["restore"] / med["bound"],
    }
