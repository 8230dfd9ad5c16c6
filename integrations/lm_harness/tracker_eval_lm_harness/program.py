"""The one compiled program per row width: score predictions, or decode greedily, on the mesh.

    program = build_program(adapter.apply_fn, packing=False, end_of_text=0, on_trace=print)
    logp, greedy, tokens, end = jax.jit(program)(params, per_token, per_row, shared)

The batch arrives as three int32 arrays (three transfers): `per_token` [B, 5, W] holds tokens,
segment ids, positions, entry columns and entry targets; `per_row` [B, 2] the generation start and
whether the row is real; `shared` the number of new tokens, the stop sequences and their lengths.

`batch["new_tokens"] == 0` scores: one forward pass, then for every entry (row, column, target)
the target's log-probability and whether it is the argmax. `new_tokens > 0` generates: a device
loop appends the argmax token to every active row until each has `new_tokens` new tokens, wrote
the end-of-text token, ended with one of the batch's stop sequences or filled its row. Scoring and
generation share the program, so a run compiles once per width. There is no KV cache: the model
contract is a plain forward pass, so each generated token costs one forward pass of the row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tracker_eval_lm_harness.rows import STOP_LEN, STOPS


def unpack(per_token: jax.Array, per_row: jax.Array, shared: jax.Array) -> dict[str, jax.Array]:
    """The named arrays of a batch (see the module docstring for the layout)."""
    names = ("tokens", "segment_ids", "positions", "entry_column", "entry_target")
    batch = {name: per_token[:, i] for i, name in enumerate(names)}
    batch.update(start=per_row[:, 0], active=per_row[:, 1], new_tokens=shared[0])
    stop_values = shared[1:1 + STOPS * STOP_LEN]
    batch.update(stops=stop_values.reshape(STOPS, STOP_LEN), stop_lengths=shared[1 + STOPS * STOP_LEN:])
    return batch


def build_program(
    apply_fn: Callable[..., Any],
    *,
    packing: bool,
    end_of_text: int,
    on_trace: Callable[[tuple[int, ...]], None],
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    """The program `(params, per_token, per_row, shared) -> (entry logp [B,W], entry greedy [B,W],
    tokens [B,W], end [B])`.

    Args:
      apply_fn: the model, `apply_fn({"params": p}, tokens[, segment_ids=, positions=])` -> logits.
      packing: pass segment ids and positions to the model.
      end_of_text: the token that ends a generation.
      on_trace: called with the batch shape whenever the program is traced (counts compiles).
    """

    def forward(params: Any, tokens: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        if packing:
            logits = apply_fn({"params": params}, tokens, segment_ids=batch["segment_ids"],
                              positions=batch["positions"])
        else:
            logits = apply_fn({"params": params}, tokens)
        return logits.astype(jnp.float32)

    def score(params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, ...]:
        tokens = batch["tokens"]
        rows, width = tokens.shape
        logits = forward(params, tokens, batch)
        vocab = logits.shape[-1]
        column, target = batch["entry_column"], batch["entry_target"]
        picked = jnp.take_along_axis(logits.reshape(rows, width * vocab), column * vocab + jnp.maximum(target, 0),
                                     axis=1)
        normalizer = jax.nn.logsumexp(logits, axis=-1)
        logp = picked - jnp.take_along_axis(normalizer, column, axis=1)
        greedy = jnp.take_along_axis(jnp.argmax(logits, axis=-1), column, axis=1) == target
        return logp, greedy, tokens, batch["start"]

    def generate(params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, ...]:
        tokens, start = batch["tokens"], batch["start"]
        rows, width = tokens.shape
        stops, stop_lengths = batch["stops"], batch["stop_lengths"]
        span = stops.shape[1]
        needed = jnp.arange(span)[None, :] >= (span - stop_lengths)[:, None]  # [stops, span]
        index = jnp.arange(rows)
        limit = batch["new_tokens"]

        def not_finished(state: tuple[jax.Array, ...]) -> jax.Array:
            step, _, _, done = state
            return (step < limit) & ~jnp.all(done)

        def next_token(state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            step, tokens, cursor, done = state
            logits = forward(params, tokens, batch)
            last = jnp.take_along_axis(logits, (cursor - 1)[:, None, None], axis=1)[:, 0]
            chosen = jnp.argmax(last, axis=-1).astype(tokens.dtype)
            write = ~done
            column = jnp.minimum(cursor, width - 1)
            tokens = tokens.at[index, column].set(jnp.where(write, chosen, tokens[index, column]))
            cursor = cursor + write.astype(cursor.dtype)
            # The last `span` tokens of each row, compared with every right-aligned stop sequence.
            window_at = cursor[:, None] - span + jnp.arange(span)[None, :]
            window = jnp.take_along_axis(tokens, jnp.clip(window_at, 0, width - 1), axis=1)
            generated = window_at >= start[:, None]
            same = (window[:, None, :] == stops[None]) & generated[:, None, :]
            hit = jnp.any(jnp.all(same | ~needed[None], axis=-1) & (stop_lengths > 0)[None], axis=-1)
            ended = (chosen == end_of_text) | hit | (cursor - start >= limit) | (cursor >= width)
            return step + 1, tokens, cursor, done | (write & ended)

        state = (jnp.zeros((), jnp.int32), tokens, start, batch["active"] == 0)
        _, tokens, cursor, _ = jax.lax.while_loop(not_finished, next_token, state)
        return jnp.zeros((rows, width), jnp.float32), jnp.zeros((rows, width), bool), tokens, cursor

    def program(params: Any, per_token: jax.Array, per_row: jax.Array, shared: jax.Array) -> tuple[jax.Array, ...]:
        batch = unpack(per_token, per_row, shared)
        on_trace(tuple(batch["tokens"].shape))
        return jax.lax.cond(batch["new_tokens"] > 0, generate, score, params, batch)

    return program
