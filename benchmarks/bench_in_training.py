"""One `InTrainingEvaluation.after_checkpoint` call against the bare eval-work loop on the same batches.

The call includes everything training pays for: the data factory's host batches, placement,
evaluation with the already-compiled step, and the ledger record (loggers are off here; their
delivery runs on background threads). The bound is the plain jitted loop of `bench_eval` over the
same batches, already on the devices. Medians over interleaved repeats.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import yaml

from benchmarks.bench_eval import make_bound
from tracker_eval.evaluation.sharding import batch_sharding, place_params
from tracker_eval.tasks import language_model as lm

BATCH, SEQ, REPEAT, REPEATS = 64, 128, 113, 7


def run() -> dict[str, float]:
    from tracker_eval import InTrainingEvaluation  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "checkpoint_dir": f"{tmp}/ckpts",
            "model": "tracker_eval.tasks.language_model:make_model",
            "eval_function": "tracker_eval.tasks.language_model:eval_function",
            "finalize": "tracker_eval.tasks.language_model:finalize",
            "data": "tracker_eval.tasks.language_model:make_eval_data",
            "data_kwargs": {"seq_len": SEQ, "repeat": REPEAT},
            "batch_size": BATCH,
            "output_dir": f"{tmp}/out",
            "loggers": [],
        }
        path = f"{tmp}/c.yaml"
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        evaluation = InTrainingEvaluation.from_config(path)
        mesh = evaluation.pipeline.mesh
        model = lm.make_model()
        params = place_params(lm.init_params(model, seq_len=SEQ), mesh, rule="replicated")
        batches = list(lm.make_eval_data(split="validation", batch_size=BATCH, seq_len=SEQ, repeat=REPEAT))
        full = [b for b in batches if len(b["inputs"]) == BATCH]
        sharded = [jax.device_put(b, batch_sharding(mesh)) for b in full]
        rng = jax.random.key(0)

        bound = make_bound(params, model, rng, sharded)

        step = 0

        def after_checkpoint() -> None:
            nonlocal step
            step += 1
            evaluation.after_checkpoint(step=step, params=params)

        bound()
        after_checkpoint()  # compiles once
        times: dict[str, list[float]] = {"bound": [], "after": []}
        for _ in range(REPEATS):
            for name, fn in (("bound", bound), ("after", after_checkpoint)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        compiles = evaluation.compile_count
        evaluation.close()
    # The bound covers the full batches only; scale it to the evaluated examples.
    examples = sum(len(b["inputs"]) for b in batches)
    bound_s = statistics.median(times["bound"]) * examples / (len(full) * BATCH)
    after_s = statistics.median(times["after"])
    print(f"  {len(batches)} batches: bound {bound_s:.3f} s, after_checkpoint {after_s:.3f} s, compiles {compiles}")
    return {
        "in_training_vs_bound_ratio": after_s / bound_s,
        "in_training_after_checkpoint_s": after_s,
        "in_training_step_compiles": float(compiles),
    }
