"""Writes the checkpoint in this folder with orbax-checkpoint 0.6.1, the way xlstm-jax's trainer does.

Run once, in a virtual environment of its own (never the project's):

    python3.11 -m venv /tmp/old-orbax
    /tmp/old-orbax/bin/pip install jax==0.4.32 jaxlib==0.4.32 orbax-checkpoint==0.6.1 flax==0.9.0
    /tmp/old-orbax/bin/python tests/data/orbax_0_6_1/make.py tests/data/orbax_0_6_1/checkpoints

Like xlstm-jax's `ModelCheckpoint` callback: a CheckpointManager with `step_prefix="checkpoint"` and
the items step, params, rng, metadata, opt_state; params keep flax's `nn.Partitioned` boxes. The
values are formulas (`values(step)`), so tests compute the same arrays independently.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

STEPS = (10,)


def values(step: int) -> dict[str, np.ndarray]:
    """The params of `step` as float32 arrays (tests repeat this formula in float64)."""
    kernel = np.linspace(-1.0, 1.0, 12).reshape(4, 3) * (step / 10)
    bias = np.array([0.5, -0.25, 0.125]) * (step / 10)
    scale = np.linspace(0.5, 2.0, 4).reshape(1, 4)  # a stacked tensor-parallel norm scale
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32), "scale": scale.astype(np.float32)}


def boxed(step: int) -> dict:
    v = values(step)
    return {
        "norm": {"scale": nn.Partitioned(jnp.asarray(v["scale"]), names=("tp", None))},
        "dense": {
            "kernel": nn.Partitioned(jnp.asarray(v["kernel"]), names=(None, "tp")),
            "bias": nn.Partitioned(jnp.asarray(v["bias"]), names=("tp",)),
        },
    }


def main(directory: str) -> None:
    handlers = {
        "step": ocp.ArrayCheckpointHandler(),
        "params": ocp.StandardCheckpointHandler(),
        "rng": ocp.ArrayCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(directory, item_names=tuple(handlers), item_handlers=handlers, options=options)
    for step in STEPS:
        params = boxed(step)
        manager.save(step, args=ocp.args.Composite(
            step=ocp.args.ArraySave(jnp.asarray(step)),
            params=ocp.args.StandardSave(params),
            rng=ocp.args.ArraySave(jax.random.key_data(jax.random.PRNGKey(step))),
            metadata=ocp.args.JsonSave({"model": {"name": "toy"}, "versions": {"orbax": ocp.__version__}}),
            opt_state=ocp.args.StandardSave(jax.tree.map(jnp.zeros_like, params)),
        ))
    manager.wait_until_finished()
    manager.close()


if __name__ == "__main__":
    main(sys.argv[1])
