"""The classification task's perceptron in flax.nnx, apart so that only an nnx config imports flax.nnx.

    model: tracker_eval.tasks.classification:make_nnx_model     # builds NnxMLP

The same layers and parameter names as the linen `tracker_eval.tasks.classification.MLP`
(``hidden``, ``out``), so one eval function serves both.
"""

from __future__ import annotations

import jax
from flax import nnx


class NnxMLP(nnx.Module):
    """The same perceptron in flax.nnx."""

    def __init__(self, *, hidden: int, num_classes: int, features: int, seed: int = 0) -> None:
        rngs = nnx.Rngs(seed)
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))
