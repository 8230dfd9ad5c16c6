"""Checkpoints written the way each trainer writes them, for one toy regression model, and its reference.

Each writer uses that trainer's own CheckpointManager options, item names and tree shape, with the
Orbax and Flax versions this project installs:

- xlstm-jax's `ModelCheckpoint`: `step_prefix="checkpoint"`, items step/params/rng/metadata/opt_state,
  params are the item itself and keep flax's `nn.Partitioned` boxes (`.../kernel/value`), a stacked
  tensor-parallel norm scale of shape (1, 4), saved from a 4-device (fsdp=2, tp=2) mesh (the test
  process has 8 devices, the watchers 2: both restore other device counts).
- MaxText's `create_orbax_checkpoint_manager`: plain `<N>` steps, one `items` item written by a
  PyTreeCheckpointHandler (OCDBT, zarr3) holding the whole train state, params under `params.params`.
- flax.nnx: `nnx.state(model)` saved with `StandardSave` in the default item (`.../kernel/value`).
- ours: `Composite(state=StandardSave(train_state))`, params under `params`.

The params of step N are a formula (`values`), which the float64 `reference` repeats.
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
from flax import nnx
from flax.training import train_state

from tracker_eval.metrics import Mean, PerExample

LAYOUTS = ("xlstm", "maxtext", "nnx", "ours")
BN_EPSILON = 1e-5  # nnx.BatchNorm's default
EXAMPLES = 13  # not a multiple of any batch size used: the last batch is padded


def values(step: int) -> dict[str, np.ndarray]:
    """The params of `step` in float64 (tests/data/orbax_0_6_1/make.py writes the same formula)."""
    return {
        "kernel": np.linspace(-1.0, 1.0, 12).reshape(4, 3) * (step / 10),
        "bias": np.array([0.5, -0.25, 0.125]) * (step / 10),
        "scale": np.linspace(0.5, 2.0, 4).reshape(1, 4),
    }


def plain_params(step: int) -> dict[str, Any]:
    v = {k: jnp.asarray(a, jnp.float32) for k, a in values(step).items()}
    return {"norm": {"scale": v["scale"]}, "dense": {"kernel": v["kernel"], "bias": v["bias"]}}


def dataset() -> tuple[np.ndarray, np.ndarray]:
    x = np.sin(np.arange(EXAMPLES * 4, dtype=np.float64).reshape(EXAMPLES, 4))
    y = np.cos(np.arange(EXAMPLES * 3, dtype=np.float64).reshape(EXAMPLES, 3))
    return x, y


def reference(step: int) -> tuple[float, np.ndarray]:
    """(mean loss, per-example losses) in float64 numpy, from the formula alone."""
    v, (x, y) = values(step), dataset()
    pred = (x * v["scale"][0]) @ v["kernel"] + v["bias"]
    losses = ((pred - y) ** 2).mean(-1)
    return float(losses.mean()), losses


def batch_stats(step: int) -> dict[str, np.ndarray]:
    """Saved BatchNorm statistics and affine params of `step` (the nnx model with batch norm)."""
    return {"mean": np.array([0.1, -0.2, 0.3]) * step / 10, "var": np.array([1.5, 0.5, 2.0]),
            "scale": np.array([1.1, 0.9, 1.2]), "bias": np.array([0.05, -0.05, 0.0])}


def reference_batchnorm(step: int) -> float:
    """Mean loss of the nnx model with batch norm in eval mode (its saved statistics), float64."""
    v, bn, (x, y) = values(step), batch_stats(step), dataset()
    pred = (x * v["scale"][0]) @ v["kernel"] + v["bias"]
    pred = (pred - bn["mean"]) / np.sqrt(bn["var"] + BN_EPSILON) * bn["scale"] + bn["bias"]
    return float(((pred - y) ** 2).mean(-1).mean())


class ToyLinen(nn.Module):
    """A norm scale stacked as (1, 4), as xlstm-jax stacks tensor-parallel norm params (read as row 0),
    then a dense layer."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = Norm(name="norm")(x)
        return nn.Dense(3, name="dense")(x * scale[0])


class Norm(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.param("scale", nn.initializers.ones, (1, x.shape[-1]))


class NnxScale(nnx.Module):
    def __init__(self) -> None:
        self.scale = nnx.Param(jnp.ones((1, 4)))


class ToyNnx(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.norm = NnxScale()
        self.dense = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(x * self.norm.scale[...][0])


class ToyNnxBatchNorm(ToyNnx):
    def __init__(self, rngs: nnx.Rngs) -> None:
        super().__init__(rngs)
        self.bn = nnx.BatchNorm(3, epsilon=BN_EPSILON, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(super().__call__(x))


def make_nnx_batchnorm() -> nnx.Module:
    return ToyNnxBatchNorm(nnx.Rngs(0))


def make_linen() -> nn.Module:
    return ToyLinen()


def make_nnx() -> nnx.Module:
    return ToyNnx(nnx.Rngs(0))


def make_data(*, split: str, batch_size: int, process_index: int = 0, process_count: int = 1) -> Any:
    del split
    x, y = dataset()
    rows = batch_size // process_count
    for start in range(0, EXAMPLES, batch_size):
        lo = start + process_index * rows
        yield {"x": x[lo : min(lo + rows, start + batch_size, EXAMPLES)].astype(np.float32),
               "y": y[lo : min(lo + rows, start + batch_size, EXAMPLES)].astype(np.float32)}


def eval_function(params: Any, apply_fn: Any, batch: Any, rng: jax.Array) -> tuple[dict[str, Any], None]:
    del rng
    pred = apply_fn({"params": params}, batch["x"])
    losses = ((pred - batch["y"]) ** 2).mean(-1)
    return {"loss": Mean(losses), "example_loss": PerExample(losses)}, None


def write(layout: str, root: str | os.PathLike[str], steps: tuple[int, ...]) -> dict[str, Any]:
    """Writes `steps` under `root` as that trainer does; returns the `checkpoint:`/`model:` settings."""
    root = os.fspath(root)
    if layout == "xlstm":
        _write_xlstm(root, steps)
        return {"model": "trainer_writers:make_linen", "checkpoint": {"item": "params", "params": None}}
    if layout == "maxtext":
        _write_maxtext(root, steps)
        return {"model": "trainer_writers:make_linen", "checkpoint": {"item": "items", "params": "params.params"}}
    if layout in ("nnx", "nnx_batchnorm"):
        _write_nnx(root, steps, batchnorm=layout == "nnx_batchnorm")
        return {"model": f"trainer_writers:make_{layout}", "checkpoint": {"params": None}}
    _write_ours(root, steps)
    return {"model": "trainer_writers:make_linen", "checkpoint": {"item": "state", "params": "params"}}


def boxed_params(step: int) -> dict[str, Any]:
    p = plain_params(step)
    return {
        "norm": {"scale": nn.Partitioned(p["norm"]["scale"], names=("tp", None))},
        "dense": {"kernel": nn.Partitioned(p["dense"]["kernel"], names=(None, "tp")),
                  "bias": nn.Partitioned(p["dense"]["bias"], names=("tp",))},
    }


def _on_four_devices(params: Any) -> Any:
    """Params placed as a 4-device (fsdp=2, tp=2) training job holds them (restored on other counts)."""
    from jax.sharding import Mesh, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tp"))
    specs = {"norm": {"scale": P(None, "fsdp")}, "dense": {"kernel": P("fsdp", None), "bias": P()}}
    return jax.tree.map(lambda box, spec: box.replace_boxed(jax.device_put(box.unbox(), NamedSharding(mesh, spec))),
                        params, specs, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _write_xlstm(root: str, steps: tuple[int, ...]) -> None:
    handlers = {"step": ocp.ArrayCheckpointHandler(), "params": ocp.StandardCheckpointHandler(),
                "rng": ocp.ArrayCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", cleanup_tmp_directories=True, create=True,
                                           enable_async_checkpointing=False)
    with ocp.CheckpointManager(root, item_names=tuple(handlers), item_handlers=handlers, options=options) as manager:
        for step in steps:
            params = _on_four_devices(boxed_params(step)) if len(jax.devices()) >= 4 else boxed_params(step)
            opt_state = optax.adamw(1e-3).init(params)
            manager.save(step, args=ocp.args.Composite(
                step=ocp.args.ArraySave(jnp.asarray(step)),
                params=ocp.args.StandardSave(params),
                rng=ocp.args.ArraySave(jax.random.key_data(jax.random.PRNGKey(step))),
                metadata=ocp.args.JsonSave({"model": {"name": "toy"}}),
                opt_state=ocp.args.StandardSave(opt_state),
            ))


def _write_maxtext(root: str, steps: tuple[int, ...]) -> None:
    handlers = {"items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)}
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    model = ToyLinen()
    with ocp.CheckpointManager(root, item_names=("items",), item_handlers=handlers, options=options) as manager:
        for step in steps:
            state = train_state.TrainState.create(apply_fn=model.apply, params={"params": plain_params(step)},
                                                  tx=optax.adam(1e-3))
            manager.save(step, args=ocp.args.Composite(items=ocp.args.PyTreeSave(state.replace(step=step))))


def _write_nnx(root: str, steps: tuple[int, ...], *, batchnorm: bool) -> None:
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        for step in steps:
            model = make_nnx_batchnorm() if batchnorm else make_nnx()
            values = plain_params(step)
            if batchnorm:
                values["bn"] = {k: jnp.asarray(v, jnp.float32) for k, v in batch_stats(step).items()}
            state = nnx.state(model)
            nnx.replace_by_pure_dict(state, values)
            nnx.update(model, state)
            manager.save(step, args=ocp.args.StandardSave(nnx.state(model)))  # every variable, stats too
            manager.wait_until_finished()


def _write_ours(root: str, steps: tuple[int, ...]) -> None:
    model = ToyLinen()
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        for step in steps:
            state = train_state.TrainState.create(apply_fn=model.apply, params=plain_params(step),
                                                  tx=optax.adam(1e-3))
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(step=step))))
            manager.wait_until_finished()
