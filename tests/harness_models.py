"""A tiny causal attention LM for the harness tests: learned absolute positions, so a packed row
that does not restart positions per segment, or lets segments see each other, changes its numbers."""

from __future__ import annotations

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
