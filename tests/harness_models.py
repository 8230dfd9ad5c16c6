"""Models for the harness tests: a tiny causal attention LM with learned absolute positions, so a
packed row that does not restart positions per segment, or lets segments see each other, changes its
numbers; and the byte LM paced by a file, so a test can act while a run is under way."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class TinyAttentionLM(nn.Module):
    """Token embedding plus position embedding, one causal self-attention layer kept within segments,
    an MLP and logits over `vocab` tokens (256: bytes)."""

    width: int = 32
    max_positions: int = 128
    vocab: int = 256

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        length = tokens.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x = nn.Embed(self.vocab, self.width, name="embed")(tokens) + nn.Embed(self.max_positions, self.width,
                                                                       name="position")(positions)
        q = nn.Dense(self.width, use_bias=False, name="query")(x)
        k = nn.Dense(self.width, use_bias=False, name="key")(x)
        v = nn.Dense(self.width, use_bias=False, name="value")(x)
        causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
        allowed = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        scores = jnp.where(allowed, jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(self.width), -1e30)
        x = x + nn.Dense(self.width, name="out")(jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, -1), v))
        x = x + nn.Dense(self.width, name="mlp")(nn.gelu(x))
        return nn.Dense(self.vocab, name="logits")(x)


def make_paced_lm(*, marker: str, delay_file: str) -> Callable[..., jax.Array]:
    """TinyLM (tracker_eval.tasks.language_model) as an apply_fn whose every program run also calls
    the host: it appends a byte to `marker` (so a test sees batches running) and sleeps the seconds
    written in `delay_file` (0 when absent), so a test can slow a run down while it watches."""
    from tracker_eval.tasks import language_model  # noqa: PLC0415

    model = language_model.make_model()

    def pace() -> None:
        with open(marker, "ab") as f:
            f.write(b".")
        try:
            with open(delay_file) as f:
                delay = float(f.read() or 0)
        except FileNotFoundError:
            delay = 0.0
        time.sleep(delay)

    def apply(variables: Any, tokens: jax.Array, segment_ids: jax.Array | None = None,
              positions: jax.Array | None = None) -> jax.Array:
        extra = {} if segment_ids is None else {"segment_ids": segment_ids, "positions": positions}
        jax.debug.callback(pace)
        return model.apply(variables, tokens, **extra)

    return apply
