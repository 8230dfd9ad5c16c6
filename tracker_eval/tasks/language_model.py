"""Language-modelling task: a tiny byte-level model on text that scikit-learn ships (no download).

    model: tracker_eval.tasks.language_model:make_model
    eval_function: tracker_eval.tasks.language_model:eval_function
    finalize: tracker_eval.tasks.language_model:finalize
    data: tracker_eval.tasks.language_model:make_eval_data

Metrics: token-weighted `loss`, `token_accuracy`, `tokens` (count), `sequence_loss` per sequence,
and `perplexity` = exp(loss) added by `finalize`.
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tracker_eval.metrics import Mean, PerExample, Sum
from tracker_eval.tasks.batching import process_batches

VOCAB = 256


class TinyLM(nn.Module):
    """Embedding, a causal convolution over the last `context` bytes, an MLP, and logits."""

    width: int = 64
    context: int = 4

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, self.width, name="embed")(tokens)
        x = nn.Conv(self.width, (self.context,), padding=((self.context - 1, 0),), name="mix")(x)
        x = x + nn.Dense(self.width, name="mlp")(nn.gelu(x))
        return nn.Dense(VOCAB, name="logits")(x)


def make_model(width: int = 64) -> TinyLM:
    """Zero-arg factory (the config's `model:`)."""
    return TinyLM(width=width)


def init_params(model: TinyLM, *, seq_len: int = 128, seed: int = 0) -> Any:
    """Fresh params (for training, tests and benchmarks)."""
    return model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))["params"]


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def eval_function(
    params: Any, apply_fn: Callable[..., Any], batch: Mapping[str, jax.Array], rng: jax.Array
) -> tuple[dict[str, Any], None]:
    """Token-weighted loss and accuracy, token count, per-sequence loss."""
    del rng
    logits = apply_fn({"params": params}, batch["inputs"])
    mask = batch["mask"].astype(jnp.float32)
    losses = token_losses(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    per_sequence = jnp.sum(losses * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    return {
        "loss": Mean(losses, weights=mask),
        "token_accuracy": Mean(correct, weights=mask),
        "tokens": Sum(mask),
        "sequence_loss": PerExample(per_sequence),
    }, None


def finalize(metrics: Mapping[str, float]) -> dict[str, float]:
    """Derived metrics: perplexity from the token-weighted loss."""
    loss = metrics.get("loss", math.nan)
    return {"perplexity": math.exp(loss) if loss < 700 else math.inf}


@functools.cache
def corpus() -> bytes:
    """Dataset descriptions bundled with scikit-learn: ~90 KB of real English text."""
    import sklearn.datasets  # noqa: PLC0415

    folder = pathlib.Path(sklearn.datasets.__file__).parent / "descr"
    return b"\n".join(p.read_bytes() for p in sorted(folder.glob("*.rst")))


def sequences(split: str, *, seq_len: int = 128) -> dict[str, np.ndarray]:
    """Non-overlapping windows; the last 10% of the text is validation. The final window is
    zero-padded and its padding masked, so token counts are uneven (what weights are for)."""
    text = np.frombuffer(corpus(), np.uint8).astype(np.int32)
    cut = int(len(text) * 0.9)
    if split == "train":
        text = text[:cut]
    elif split in ("validation", "test"):
        text = text[cut:]
    else:
        raise ValueError(f"split {split!r} is not one of train, validation, test")
    n = -(-(len(text) - 1) // seq_len)
    padded = np.zeros(n * seq_len + 1, np.int32)
    padded[: len(text)] = text
    valid = np.zeros(n * seq_len + 1, bool)
    valid[1 : len(text)] = True
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len)[None, :]
    return {"inputs": padded[index], "targets": padded[index + 1], "mask": valid[index + 1]}


def make_eval_data(
    *,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seq_len: int = 128,
    repeat: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """The data factory; `repeat` tiles the split for longer benchmark runs."""
    data = sequences(split, seq_len=seq_len)
    if repeat > 1:
        data = {k: np.concatenate([v] * repeat) for k, v in data.items()}
    return process_batches(data, batch_size=batch_size, process_index=process_index, process_count=process_count)
