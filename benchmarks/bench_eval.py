"""Extended evaluation throughput against a bare jitted loop doing the same work.

The bound: the same model and eval function under a plain `jax.jit`, sums kept on device, over the
same pre-sharded batches, with nothing around it. `eval_model` is timed with pre-sharded batches
and with host numpy batches that it must place and prefetch itself. A forward-only loop and the
naive baseline (per-batch `jax.device_get`, host accumulation) are printed for reference. The same
metrics written in xlstm-jax's format ({"value", "count"} sums, evaluated row by row) are timed
against the `Mean` path. The compile counts come from JAX's backend-compile events over a fresh
evaluation with a short last batch.
Medians over interleaved repeats; 8 fake CPU devices (`make bench` sets XLA_FLAGS).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tracker_eval.config import MeshConfig
from tracker_eval.evaluation.evaluator import ExtendedEvaluation
from tracker_eval.evaluation.sharding import batch_sharding, make_mesh, place_params
from tracker_eval.evaluation.state import EvalState
from tracker_eval.tasks import language_model as lm

BATCH, SEQ, BATCHES, REPEATS, WINDOW = 64, 128, 60, 11, 2


def _batches() -> list[dict[str, np.ndarray]]:
    data = lm.sequences("validation", seq_len=SEQ)
    rows = np.resize(np.arange(len(data["inputs"])), BATCH * BATCHES)
    return [{k: v[rows[i * BATCH:(i + 1) * BATCH]] for k, v in data.items()} for i in range(BATCHES)]


def xlstm_eval_function(params, apply_fn, batch, rng):
    """`lm.eval_function`'s metrics as xlstm-jax returns them: sums with counts, per-sequence rows."""
    del rng
    logits = apply_fn({"params": params}, batch["inputs"])
    mask = batch["mask"].astype(jnp.float32)
    losses = lm.token_losses(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    per_sequence = jnp.sum(losses * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    return {
        "loss": {"value": jnp.sum(losses * mask), "count": jnp.sum(mask)},
        "token_accuracy": {"value": jnp.sum(correct * mask), "count": jnp.sum(mask)},
        "sequence_loss": {"value": per_sequence, "count": per_sequence.shape[0], "log_modes": ("single_noreduce",)},
    }, None


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_bound(params, model, rng, sharded):
    """The bare loop: the same model and eval function under plain `jax.jit`, sums on device.

    It keeps at most WINDOW steps in flight: unbounded dispatch of collective programs deadlocks
    XLA's CPU runtime with 8 fake devices on 2 cores (the evaluator bounds it the same way).
    """

    @jax.jit
    def bound_step(acc, batch):
        metrics, _ = lm.eval_function(params, model.apply, batch, rng)
        w = batch["mask"].astype(jnp.float32)
        return acc + jnp.stack([jnp.sum(metrics["loss"].values * w), jnp.sum(w),
                                jnp.sum(metrics["token_accuracy"].values * w)])

    def bound() -> None:
        accs = [jnp.zeros(3)]
        for i, b in enumerate(sharded):
            if i >= WINDOW:
                accs[i - WINDOW].block_until_ready()
            accs.append(bound_step(accs[-1], b))
        jax.block_until_ready(accs[-1])

    return bound


def make_partials_bound(params, model, rng, sharded, shards: int):
    """A second bare loop that, like `eval_model`, keeps one partial sum per batch shard on each
    device (no cross-device reduction per batch) and adds the partials on the host at the end.
    `eval_model` against it isolates the framework's own overhead from the reduction strategy."""

    @jax.jit
    def partials_step(acc, batch):
        metrics, _ = lm.eval_function(params, model.apply, batch, rng)
        w = batch["mask"].astype(jnp.float32)

        def per_shard(values):
            return jnp.sum((values * w).reshape(shards, -1), axis=1)

        return acc + jnp.stack([per_shard(metrics["loss"].values), per_shard(w),
                                per_shard(metrics["token_accuracy"].values)], axis=1)

    def bound() -> None:
        accs = [jax.device_put(jnp.zeros((shards, 3)), sharded[0]["inputs"].sharding)]
        for i, b in enumerate(sharded):
            if i >= WINDOW:
                accs[i - WINDOW].block_until_ready()
            accs.append(partials_step(accs[-1], b))
        np.asarray(accs[-1]).sum(axis=0)

    return bound


def count_step_compiles(model, mesh, params, host, eval_function=lm.eval_function) -> int:
    """XLA compiles of the eval step over a fresh evaluation whose last batch is short, counted
    from JAX's own backend-compile events (not from tracing)."""
    names: list[str] = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        fresh = ExtendedEvaluation(model=model, mesh=mesh, batch_size=BATCH, eval_function=eval_function,
                                   finalize_fn=lm.finalize, progress=False)
        fresh.set_state(EvalState.create(apply_fn=model.apply, params=params))
        short = {k: v[: BATCH // 3] for k, v in host[0].items()}
        fresh.eval_model([*host[:5], short])
    finally:
        jax.monitoring.clear_event_listeners()
    return sum("eval_step" in name for name in names)


def run() -> dict[str, float]:
    mesh = make_mesh(MeshConfig(data=-1))
    model = lm.make_model()
    params = place_params(lm.init_params(model, seq_len=SEQ), mesh, rule="replicated")
    host = _batches()
    sharded = [jax.device_put(b, batch_sharding(mesh)) for b in host]
    rng = jax.random.key(0)

    bound = make_bound(params, model, rng, sharded)
    partials_bound = make_partials_bound(params, model, rng, sharded, shards=len(jax.devices()))
    forward_jit = jax.jit(lambda batch: jnp.sum(model.apply({"params": params}, batch["inputs"])))

    def naive_step(batch):
        metrics, _ = lm.eval_function(params, model.apply, batch, rng)
        w = batch["mask"].astype(jnp.float32)
        return {"loss": jnp.sum(metrics["loss"].values * w), "weight": jnp.sum(w),
                "accuracy": jnp.sum(metrics["token_accuracy"].values * w),
                "sequence_loss": metrics["sequence_loss"].values}

    naive_jit = jax.jit(naive_step)

    def forward():
        out = []
        for i, b in enumerate(sharded):
            if i >= WINDOW:
                out[i - WINDOW].block_until_ready()
            out.append(forward_jit(b))
        jax.block_until_ready(out)

    def naive():
        sums, rows = np.zeros(3), None
        for b in sharded:  # the seed's pattern: every batch's metrics copied to the host
            values = jax.device_get(naive_jit(b))
            sums += [values["loss"], values["weight"], values["accuracy"]]
            rows = values["sequence_loss"] if rows is None else np.concatenate([rows, values["sequence_loss"]])

    evaluation = ExtendedEvaluation(model=model, mesh=mesh, batch_size=BATCH, eval_function=lm.eval_function,
                                    finalize_fn=lm.finalize, progress=False)
    state = EvalState.create(apply_fn=model.apply, params=params)
    evaluation.set_state(state)

    def ours_sharded():
        evaluation.eval_model(sharded)

    def ours_host():
        evaluation.eval_model(host)

    xlstm = ExtendedEvaluation(model=model, mesh=mesh, batch_size=BATCH, eval_function=xlstm_eval_function,
                               finalize_fn=lm.finalize, progress=False)
    xlstm.set_state(state)

    def xlstm_sharded():
        xlstm.eval_model(sharded)

    runs = {"bound": bound, "partials_bound": partials_bound, "forward": forward, "naive": naive,
            "sharded": ours_sharded, "host": ours_host, "xlstm": xlstm_sharded}
    for fn in runs.values():  # compile and warm every path once
        fn()
    traces_before = evaluation.trace_count + xlstm.trace_count
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(REPEATS):
        for name, fn in runs.items():
            times[name].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    assert evaluation.trace_count + xlstm.trace_count == traces_before, "the timed evaluations recompiled"
    examples = BATCH * BATCHES
    print(f"  median seconds over {REPEATS} repeats of {BATCHES} batches of {BATCH}x{SEQ} tokens: "
          + ", ".join(f"{k}={v:.3f}" for k, v in med.items()))
    return {
        "eval_vs_bound_ratio": med["bound"] / med["sharded"],
        "eval_vs_bound_host_ratio": med["bound"] / med["host"],
        "eval_vs_partials_bound_ratio": med["partials_bound"] / med["sharded"],
        "eval_vs_naive_ratio": med["naive"] / med["sharded"],
        "eval_vs_forward_ratio": med["forward"] / med["sharded"],
        "eval_step_compiles": float(count_step_compiles(model, mesh, params, host)),
        "eval_xlstm_format_cost_ratio": med["xlstm"] / med["sharded"],
        "eval_xlstm_format_step_compiles": float(count_step_compiles(model, mesh, params, host, xlstm_eval_function)),
        "eval_examples_per_s": examples / med["sharded"],
        "eval_examples_per_s_host": examples / med["host"],
        "bound_examples_per_s": examples / med["bound"],
    }
