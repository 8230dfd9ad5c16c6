"""Classification task: a small MLP on scikit-learn's bundled 8x8 digits (no download).

    model: tracker_eval.tasks.classification:make_model         # flax.linen
    model: tracker_eval.tasks.classification:make_nnx_model     # flax.nnx, same eval function
    eval_function: tracker_eval.tasks.classification:eval_function
    data: tracker_eval.tasks.classification:make_eval_data

Metrics: loss (mean cross-entropy), accuracy, and their per-example values (`example_loss`,
`example_accuracy`: 1 or 0 per example), which give `loss_stderr`, `accuracy_stderr` and paired comparisons.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tracker_eval.metrics import Mean, PerExample
from tracker_eval.tasks.batching import process_batches

NUM_CLASSES = 10
FEATURES = 64


class MLP(nn.Module):
    """Two-layer perceptron."""

    hidden: int = 64
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(self.num_classes, name="out")(x)


def make_model(hidden: int = 64) -> MLP:
    """Zero-arg factory (the config's `model:`) for the linen MLP."""
    return MLP(hidden=hidden)


def make_nnx_model(hidden: int = 64, seed: int = 0) -> Any:
    """Zero-arg factory for the nnx MLP (`tracker_eval.tasks.classification_nnx`); its params come
    from the checkpoint. flax.nnx is imported only here, so a linen model's process never pays for it."""
    from tracker_eval.tasks.classification_nnx import NnxMLP  # noqa: PLC0415

    return NnxMLP(hidden=hidden, num_classes=NUM_CLASSES, features=FEATURES, seed=seed)


def init_params(model: MLP, *, seed: int = 0) -> Any:
    """Fresh params of the linen MLP (for training and tests)."""
    return model.init(jax.random.key(seed), jnp.zeros((1, FEATURES)))["params"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def eval_function(
    params: Any, apply_fn: Callable[..., Any], batch: Mapping[str, jax.Array], rng: jax.Array
) -> tuple[dict[str, Any], None]:
    """Loss, accuracy and their per-example values for one batch."""
    del rng
    logits = apply_fn({"params": params}, batch["x"])
    loss = cross_entropy(logits, batch["y"])
    correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    return {"loss": Mean(loss), "accuracy": Mean(correct), "example_loss": PerExample(loss),
            "example_accuracy": PerExample(correct)}, None


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as float32 features in [0, 1] and int32 labels, fixed shuffled order.

    Read straight from the CSV file scikit-learn ships (what its `load_digits` reads): importing
    scikit-learn itself takes seconds, more than the rest of a small evaluation's start.
    """
    table = _bundled_digits()
    if table is None:  # a scikit-learn that keeps the file elsewhere
        from sklearn.datasets import load_digits as sk_load  # noqa: PLC0415 - only the tasks need sklearn

        data = sk_load()
        features, labels = data.data, data.target
    else:
        features, labels = table[:, :-1], table[:, -1]
    order = np.random.RandomState(0).permutation(len(labels))
    return (features[order] / 16.0).astype(np.float32), labels[order].astype(np.int32)


def _bundled_digits() -> np.ndarray | None:
    """scikit-learn's digits table (64 pixel columns, then the label), found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("the digits data comes with scikit-learn; pip install scikit-learn")
    path = pathlib.Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return np.loadtxt(path, delimiter=",") if path.is_file() else None


def split_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """train: the first 1,400 examples; validation: the remaining 397."""
    x, y = load_digits()
    if split == "train":
        return x[:1400], y[:1400]
    if split in ("validation", "test"):
        return x[1400:], y[1400:]
    raise ValueError(f"split {split!r} is not one of train, validation, test")


def make_eval_data(
    *, split: str, batch_size: int, process_index: int = 0, process_count: int = 1, limit: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """The data factory: this process's slice of each global batch of the split."""
    x, y = split_digits(split)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return process_batches(
        {"x": x, "y": y}, batch_size=batch_size, process_index=process_index, process_count=process_count
    )
