"""Language-modelling task: a tiny byte-level model on text that ships with scikit-learn or Python.

    model: tracker_eval.tasks.language_model:make_model
    eval_function: tracker_eval.tasks.language_model:eval_function
    finalize: tracker_eval.tasks.language_model:finalize
    data: tracker_eval.tasks.language_model:make_eval_data

Metrics: token-weighted `loss`, `token_accuracy`, `tokens` (count), `sequence_loss` per sequence,
and `perplexity` = exp(loss) added by `finalize`. `data_kwargs: {corpus: pydoc}` evaluates on the
held-out pydoc topics instead of scikit-learn's dataset descriptions.

The model also serves packed rows (several sequences per row, as the LM Evaluation Harness suite
sends with `packing: true`): `apply_fn({"params": p}, tokens, segment_ids=s, positions=q)` keeps
each segment's convolution inside the segment; positions are accepted and not needed (a
convolution is the same at every position).
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
from tracker_eval.tasks import pydoc_text
from tracker_eval.tasks.batching import process_batches

VOCAB = 256
CORPORA = ("sklearn", "pydoc")


class CausalMix(nn.Module):
    """A causal convolution over the last `context` positions, with `nn.Conv`'s parameters and
    numbers; given segment ids, positions of other segments contribute nothing."""

    features: int
    context: int

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.context, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if segment_ids is None:
            out = jax.lax.conv_general_dilated(x, kernel, (1,), [(self.context - 1, 0)],
                                               dimension_numbers=("NWC", "WIO", "NWC"))
            return out + bias
        length = x.shape[1]
        out = bias
        for lag in range(self.context):  # kernel[context - 1 - lag] reads position t - lag
            shifted = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, :length]
            earlier = jnp.pad(segment_ids, ((0, 0), (lag, 0)), constant_values=-1)[:, :length]
            out = out + jnp.where((earlier == segment_ids)[..., None], shifted, 0.0) @ kernel[self.context - 1 - lag]
        return out


class TinyLM(nn.Module):
    """Embedding, a causal convolution over the last `context` bytes, an MLP, and logits."""

    width: int = 64
    context: int = 4

    @nn.compact
    def __call__(
        self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        del positions  # the same convolution at every position
        x = nn.Embed(VOCAB, self.width, name="embed")(tokens)
        x = CausalMix(self.width, self.context, name="mix")(x, segment_ids)
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


def split_text(split: str, *, corpus_name: str = "sklearn") -> bytes:
    """The bytes of one split: the last 10% of scikit-learn's text, or pydoc's held-out topics."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split {split!r} is not one of train, validation, test")
    if corpus_name == "pydoc":
        return pydoc_text.text("train" if split == "train" else "heldout").encode("utf-8")
    if corpus_name != "sklearn":
        raise ValueError(f"corpus {corpus_name!r} is not one of {', '.join(CORPORA)}")
    text = corpus()
    cut = int(len(text) * 0.9)
    return text[:cut] if split == "train" else text[cut:]


def sequences(split: str, *, seq_len: int = 128, corpus_name: str = "sklearn") -> dict[str, np.ndarray]:
    """Non-overlapping windows of a split. The final window is zero-padded and its padding masked,
    so token counts are uneven (what weights are for)."""
    text = np.frombuffer(split_text(split, corpus_name=corpus_name), np.uint8).astype(np.int32)
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
    corpus: str = "sklearn",
) -> Iterator[dict[str, np.ndarray]]:
    """The data factory; `repeat` tiles the split for longer benchmark runs; `corpus` is sklearn or pydoc."""
    data = sequences(split, seq_len=seq_len, corpus_name=corpus)
    if repeat > 1:
        data = {k: np.concatenate([v] * repeat) for k, v in data.items()}
    return process_batches(data, batch_size=batch_size, process_index=process_index, process_count=process_count)
