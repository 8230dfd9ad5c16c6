"""The LM Evaluation Harness suite against the seed's way of serving lm-eval requests.

The naive baseline is the seed's `LMEvalEvaluation`: one request per row padded to `max_length`,
the jitted forward pass, and the results copied to the host after every batch. The harness path is
`HarnessLM.score`: requests sorted by length into rows of a few widths (or packed several to a row:
TinyLM honours segment ids), results read once. Each is timed against a baseline that calls the
model the same way (the packed path with segment ids, which TinyLM computes with shifted matmuls; the
row path without, a convolution), so the ratios measure the serving, not two implementations of
the model. All get the same token pairs, lengths log-uniform in 16..512, `max_length` 512, 32 rows
a batch, and must agree. Then a whole suite (lm-eval's `evaluate` on the shipped pydoc tasks) gives
the compile count and lm-eval's own share of its time (outside the model's requests). Generation
(no KV cache: one forward pass of the row per new token) is reported per token.
Repeats are interleaved (each runs the four paths one after another); a ratio is the median over
repeats of that repeat's ratio, so both sides of each ratio are timed under the same load of a
shared machine. 8 fake CPU devices (`make bench` sets XLA_FLAGS).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tracker_eval.config import MeshConfig
from tracker_eval.evaluation.models import adapt_model
from tracker_eval.evaluation.sharding import batch_sharding, make_mesh, place_params
from tracker_eval.tasks import language_model as lm
from tracker_eval.tasks import pydoc_text

MAX_LENGTH, ROWS, REQUESTS, REPEATS = 512, 32, 1024, 11


def _pairs(rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
    """Token pairs with total lengths log-uniform in 16..512 and 1-8 continuation tokens, cut from real text."""
    text = np.frombuffer(pydoc_text.text("heldout").encode(), np.uint8).astype(int)
    lengths = np.exp(rng.uniform(np.log(16), np.log(MAX_LENGTH), REQUESTS)).astype(int)
    pairs = []
    for n in lengths:
        start = int(rng.integers(0, len(text) - n - 1))
        cont = int(rng.integers(1, 9))
        tokens = text[start:start + n + 1].tolist()  # n model inputs after truncation
        pairs.append((tokens[:-cont], tokens[-cont:]))
    return pairs


def _naive(model, params, mesh, pairs, *, segment_ids: bool):
    """The seed's approach: one request per row, padded to max_length, a host copy per batch."""

    @jax.jit
    def step(params, tokens, targets, mask):
        extra = {"segment_ids": jnp.ones_like(tokens)} if segment_ids else {}
        logits = model.apply({"params": params}, tokens, **extra).astype(jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        greedy = (jnp.argmax(logits, -1) == targets) | ~mask
        return jnp.sum(jnp.where(mask, logp, 0.0), -1), jnp.all(greedy, -1)

    sharding = batch_sharding(mesh)

    def run() -> tuple[np.ndarray, np.ndarray]:
        logps, greedies = [], []
        for first in range(0, len(pairs), ROWS):
            tokens = np.zeros((ROWS, MAX_LENGTH), np.int32)
            targets = np.zeros((ROWS, MAX_LENGTH), np.int32)
            mask = np.zeros((ROWS, MAX_LENGTH), bool)
            for r, (ctx, cont) in enumerate(pairs[first:first + ROWS]):
                whole = (ctx + cont)[-(MAX_LENGTH + 1):]
                n = len(whole) - 1
                tokens[r, :n] = whole[:-1]
                targets[r, :n] = whole[1:]
                mask[r, n - len(cont):n] = True
            placed = [jax.device_put(a, sharding) for a in (tokens, targets, mask)]
            logp, greedy = jax.device_get(step(params, *placed))  # the seed's per-batch sync
            count = min(ROWS, len(pairs) - first)
            logps.append(logp[:count])
            greedies.append(greedy[:count])
        return np.concatenate(logps), np.concatenate(greedies)

    return run


def _compiles(fn) -> int:
    """XLA compiles of the suite's program while `fn` runs (JAX's backend-compile events by name)."""
    names: list[str] = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        fn()
    finally:
        jax.monitoring.clear_event_listeners()
    return sum(name == "jit(program)" for name in names)


def run() -> dict[str, float]:
    from tracker_eval_lm_harness.suite import HarnessSuite  # noqa: PLC0415

    mesh = make_mesh(MeshConfig(data=-1))
    model = lm.make_model()
    adapter = adapt_model(model)
    params = place_params(lm.init_params(model, seed=0), mesh, rule="replicated")
    pairs = _pairs(np.random.default_rng(0))

    def suite(packing: bool, tasks=("pydoc_cloze",), limit=None) -> HarnessSuite:
        options = {"tasks": list(tasks), "max_length": MAX_LENGTH, "batch_size": ROWS, "packing": packing}
        if limit:
            options["limit"] = limit
        return HarnessSuite(HarnessSuite.Config.from_mapping(options), adapter=adapter, mesh=mesh, name=f"b{packing}")

    from tracker_eval_lm_harness.lm import HarnessLM  # noqa: PLC0415 - after the suite set the offline switches

    scorers = {}
    for packing in (True, False):
        built = suite(packing)
        scorers[packing] = HarnessLM(tokenizer=built.tokenizer, engine=built.engine, params=params,
                                     max_length=MAX_LENGTH, widths=built.widths, packing=packing)
    runs = {"packed": lambda: scorers[True].score(pairs),
            "naive_packed": _naive(model, params, mesh, pairs, segment_ids=True),
            "rows": lambda: scorers[False].score(pairs),
            "naive_rows": _naive(model, params, mesh, pairs, segment_ids=False)}
    first = {name: fn() for name, fn in runs.items()}  # compile and warm every path
    for name in ("packed", "rows"):
        np.testing.assert_allclose(first[name][0], first[f"naive_{name}"][0], rtol=1e-4)
        assert (first[name][1] == first[f"naive_{name}"][1]).all(), name
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(REPEATS):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = {name: statistics.median(slow / fast for slow, fast in zip(times[f"naive_{name}"], times[name],
                                                                       strict=True)) for name in ("packed", "rows")}
    print("  seconds per repeat: " + "; ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in times.items()))
    tokens = sum(min(len(c) + len(x), MAX_LENGTH + 1) - 1 for c, x in pairs)
    print(f"  {REQUESTS} requests, {tokens} tokens; median seconds over {REPEATS} repeats: "
          + ", ".join(f"{k}={v:.3f}" for k, v in med.items())
          + f"; ratios of the medians: packed {med['naive_packed'] / med['packed']:.2f}, rows "
          + f"{med['naive_rows'] / med['rows']:.2f}")

    whole = suite(True, tasks=("pydoc",), limit=40)
    compiles = _compiles(lambda: whole.run(params, step=0))
    shares, seconds = [], []
    for step in range(3):
        result = whole.run(params, step=step + 1)
        shares.append(result.provenance["lm_eval_overhead_share"])
        seconds.append(result.provenance["seconds"])
    generated = _generation_rate(scorers[True], params)
    return {
        "harness_requests_per_s": REQUESTS / med["packed"],
        "harness_vs_naive_ratio": ratio["packed"],
        "harness_unpacked_vs_naive_ratio": ratio["rows"],
        "harness_compiles": float(compiles),
        "harness_lm_eval_overhead_share": statistics.median(shares),
        "harness_suite_seconds": statistics.median(seconds),
        "harness_generated_tokens_per_s": generated,
        "harness_scored_tokens_per_s": tokens / med["packed"],
    }


def _generation_rate(scorer, params) -> float:
    """New tokens per second of greedy generation: 64 prompts of 100 bytes, 24 new tokens each (no stop)."""
    from tracker_eval_lm_harness import generation  # noqa: PLC0415

    text = pydoc_text.text("heldout")
    prompts = [list(text[i * 100:(i + 1) * 100].encode()) for i in range(64)]
    generation.greedy_tokens(scorer, prompts, max_new=24, until=[])
    times, count = [], 0
    for _ in range(REPEATS):
        start = time.perf_counter()
        count = sum(map(len, generation.greedy_tokens(scorer, prompts, max_new=24, until=[])))
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)
