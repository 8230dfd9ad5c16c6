"""The one compiled program per row width: a forward pass and the predictions lm-eval asks about.

    program = build_program(adapter.apply_fn, packing=False, extras=lambda width: 32, on_trace=print)
    out = jax.jit(program)(params, batch)      # batch: int32 [B, 6, W] -> float32 [B, 3, W]
    logp, best, extra_logp = out[:, 0], out[:, 1].astype(int), out[:, 2, :32]

`batch[:, k]` holds the rows' tokens, segment ids, positions, targets, extra columns and extra
targets (see `rows`). `logp[b, c]` is the log-probability of the target at column c (one per
column, read densely as the model's own output is laid out), `extra_logp[b, k]` that of the k-th
extra (column, target) pair, and `best[b, c]` the argmax token at column c (exact as a float32
below 2**24): whether a continuation is greedy, and the next token in greedy generation, which
runs one step at a time through this same program. The three come back as one array, one copy to
the host a batch. The program has no control flow (XLA's CPU runtime runs loops and conditionals
far slower than fused straight-line code) and no communication between rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def build_program(
    apply_fn: Callable[..., Any],
    *,
    packing: bool,
    extras: Callable[[int], int],
    on_trace: Callable[[tuple[int, int]], None],
) -> Callable[[Any, jax.Array], jax.Array]:
    """The program `(params, batch [B, 6, W]) -> [B, 3, W]`: logp, argmax and the X extra logps.

    Args:
      apply_fn: the model, `apply_fn({"params": p}, tokens[, segment_ids=, positions=])` -> logits.
      packing: pass segment ids and positions to the model.
      extras: X, the number of extra pairs per row, for a row width.
      on_trace: called with (rows, width) whenever the program is traced (counts compiles).
    """

    def program(params: Any, batch: jax.Array) -> jax.Array:
        rows, _, width = batch.shape
        on_trace((rows, width))
        tokens, segment_ids, positions, target = batch[:, 0], batch[:, 1], batch[:, 2], batch[:, 3]
        if packing:
            logits = apply_fn({"params": params}, tokens, segment_ids=segment_ids, positions=positions)
        else:
            logits = apply_fn({"params": params}, tokens)
        logits = logits.astype(jnp.float32)
        vocab = logits.shape[-1]
        normalizer = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0] - normalizer
        count = extras(width)
        column, extra_target = batch[:, 4, :count], jnp.maximum(batch[:, 5, :count], 0)
        picked = jnp.take_along_axis(logits.reshape(rows, width * vocab), column * vocab + extra_target, axis=1)
        extra_logp = picked - jnp.take_along_axis(normalizer, column, axis=1)
        best = jnp.argmax(logits, axis=-1).astype(jnp.float32)
        return jnp.stack([logp, best, jnp.pad(extra_logp, ((0, 0), (0, width - count)))], axis=1)

    return program
