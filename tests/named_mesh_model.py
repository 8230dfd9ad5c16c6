"""A model that calls collectives over its own mesh axis names, as xlstm-jax's modules do.

Its forward pass is a tensor-parallel MLP inside `shard_map` over a mesh with axes (dp, fsdp, tp):
the batch split over (dp, fsdp), the hidden units over tp, and a `jax.lax.psum` over "tp" adds the
partial outputs. It gets the mesh either from its factory's `mesh` argument (`make_model`) or as the
mesh current while it is traced (`make_model_current`).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.sharding import PartitionSpec as P

BATCH = ("dp", "fsdp")
HIDDEN = 8


class TensorParallelMLP(nn.Module):
    mesh: jax.sharding.Mesh | None = None  # None: the mesh current while traced

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w1 = self.param("w1", nn.initializers.lecun_normal(), (x.shape[-1], HIDDEN))
        w2 = self.param("w2", nn.initializers.lecun_normal(), (HIDDEN, 3))

        def block(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
            # Each tp shard holds HIDDEN / tp hidden units: its output is a partial sum.
            return jax.lax.psum(jnp.tanh(x @ w1) @ w2, "tp")

        return jax.shard_map(block, mesh=self.mesh, in_specs=(P(BATCH), P(None, "tp"), P("tp", None)),
                             out_specs=P(BATCH))(x, w1, w2)


def make_model(*, mesh: jax.sharding.Mesh) -> nn.Module:
    return TensorParallelMLP(mesh=mesh)


def make_model_current() -> nn.Module:
    return TensorParallelMLP()


def values(step: int) -> dict[str, np.ndarray]:
    """Float64 params of `step`."""
    return {"w1": np.cos(np.arange(4 * HIDDEN).reshape(4, HIDDEN)) * step / 10,
            "w2": np.sin(np.arange(HIDDEN * 3).reshape(HIDDEN, 3)) / 2}


def reference(step: int, x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error in float64 numpy, no tracker_eval or jax on the path."""
    v = values(step)
    pred = np.tanh(x @ v["w1"]) @ v["w2"]
    return float(((pred - y) ** 2).mean(-1).mean())


def write(root: str | os.PathLike[str], step: int) -> None:
    """Our default layout: `Composite(state=StandardSave(train_state))`."""
    params = {k: jnp.asarray(v, jnp.float32) for k, v in values(step).items()}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1))
    with ocp.CheckpointManager(os.fspath(root), options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()


def settings() -> dict[str, Any]:
    return {"mesh": {"axes": {"dp": 1, "fsdp": 2, "tp": 2}, "batch_axes": list(BATCH)},
            "checkpoint": {"item": "state"}}
