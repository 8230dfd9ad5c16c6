"""Writes real Orbax checkpoints of a small Flax model's train state for tests and benchmarks.

Each saved step holds `params`, `batch_stats` (BatchNorm), `opt_state` (optax Adam, after one real
update so `mu`/`nu` are non-zero) and `step`, sharded fsdp-style over a mesh of the local devices,
exactly as a training job would write them. The numpy values of what was saved come back so tests
can compare restored arrays bit for bit.

    saved = save_train_states(tmp_path / "ckpts", steps=[10, 20], item="state")
    saved[20].params["Dense_0"]["kernel"]  # np.ndarray written at step 20

Needs as many local devices as the mesh has (tests run with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state as flax_train_state

Layout = Literal["composite", "standard"]
"""`composite`: `save(step, args=Composite(<item>=StandardSave(state), metadata=JsonSave(...)))`.
`standard`: `save(step, args=StandardSave(state))`, which Orbax stores under the item `default`."""

StateKind = Literal["dict", "train_state"]
"""`dict`: a plain nested dict. `train_state`: a flax `TrainState` subclass carrying `batch_stats`."""


class MLP(nn.Module):
    """Dense + BatchNorm + relu per hidden layer, then a Dense head: params and batch_stats."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for width in self.features[:-1]:
            x = nn.Dense(width)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        return nn.Dense(self.features[-1])(x)


class BatchStatsTrainState(flax_train_state.TrainState):
    """The usual flax recipe for a model with BatchNorm: a TrainState with a `batch_stats` field."""

    batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class SavedStep:
    """What one `save_train_states` step wrote, as host numpy values.

    Attributes:
        step: The checkpoint step.
        path: The step directory `<directory>/<step>`.
        item: Item name the train state lives under (`default` for the `standard` layout).
        params: Params tree (nested dicts of np.ndarray).
        batch_stats: BatchNorm statistics tree.
        opt_state: Adam state as saved (optax namedtuples of np.ndarray).
    """

    step: int
    path: pathlib.Path
    item: str
    params: Any
    batch_stats: Any
    opt_state: Any


def make_mesh(
    shape: Sequence[int], axis_names: Sequence[str], *, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Builds a mesh with Auto axis types over the first `prod(shape)` devices (or `devices`).

    Args:
        shape: Mesh shape, e.g. (8,) or (2, 2, 2).
        axis_names: One name per mesh axis.
        devices: Devices to use; defaults to the first `prod(shape)` of `jax.devices()`.

    Returns:
        The mesh. Auto axis types keep ordinary GSPMD code working under JAX 0.10.
    """
    size = math.prod(shape)
    chosen = list(devices) if devices is not None else jax.devices()[:size]
    if len(chosen) != size:
        raise ValueError(f"mesh {tuple(shape)} needs {size} devices, got {len(chosen)}")
    return jax.make_mesh(
        tuple(shape),
        tuple(axis_names),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
        devices=chosen,
    )


def fsdp_sharding(shape: Sequence[int], mesh: jax.sharding.Mesh, *, axis: str) -> jax.sharding.NamedSharding:
    """Shards the largest dimension divisible by the `axis` size over it; replicates the rest.

    Args:
        shape: Array shape.
        mesh: The mesh.
        axis: Mesh axis to shard over.

    Returns:
        A NamedSharding on `mesh`.
    """
    size = mesh.shape[axis]
    spec: list[str | None] = [None] * len(shape)
    candidates = [d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size]
    if candidates and size > 1:
        spec[max(candidates, key=lambda d: shape[d])] = axis
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _params_for_step(base: Any, step: int) -> Any:
    # Distinct, exactly representable values per step, so a restore of the wrong step cannot pass.
    return jax.tree.map(lambda x: (np.asarray(x) + np.float32(step) / np.float32(1024)).astype(np.float32), base)


def save_train_states(
    directory: str | os.PathLike[str],
    *,
    steps: Sequence[int],
    item: str = "state",
    layout: Layout = "composite",
    state_kind: StateKind = "dict",
    features: Sequence[int] = (64, 32, 16),
    in_features: int = 24,
    mesh_shape: Sequence[int] = (8,),
    fsdp_axis: str = "fsdp",
    use_ocdbt: bool = True,
    seed: int = 0,
) -> dict[int, SavedStep]:
    """Writes one finalized Orbax checkpoint per step of an MLP train state with Adam state.

    Args:
        directory: CheckpointManager root; created if missing. Existing steps are kept.
        steps: Steps to write, in any order; each must be newer than what `directory` holds, because
            `CheckpointManager.save` silently skips older steps.
        item: Item name for the `composite` layout (ignored for `standard`, which uses `default`).
        layout: `composite` or `standard`; see `Layout`.
        state_kind: `dict` or `train_state`; see `StateKind`. Both give the same on-disk tree.
        features: Layer widths of the MLP; the last is the output width. Widths divisible by the
            mesh size are sharded, others replicated. Scale these up for benchmarks.
        in_features: Input width (rows of the first kernel).
        mesh_shape: Shape of the save mesh; its first axis is the fsdp axis and the other axes
            (named `m1`, `m2`, ...) replicate, like a data-parallel axis.
        fsdp_axis: Name of the axis params and Adam moments are sharded over.
        use_ocdbt: Orbax's default OCDBT format packs all arrays of an item into shared data files;
            False writes one directory per array (`<item>/opt_state.0.mu.Dense_0.kernel/`), so a
            test can damage exactly one array.
        seed: PRNG seed of the initial params.

    Returns:
        {step: SavedStep} with the numpy values written at each step.
    """
    axis_names = (fsdp_axis, *(f"m{i}" for i in range(1, len(mesh_shape))))
    mesh = make_mesh(mesh_shape, axis_names)
    model = MLP(features=tuple(features))
    variables = model.init(jax.random.key(seed), np.zeros((1, in_features), np.float32))
    base_params = jax.device_get(variables["params"])
    base_stats = jax.device_get(variables["batch_stats"])
    tx = optax.adam(1e-3)

    def put(tree: Any) -> Any:
        return jax.tree.map(lambda x: jax.device_put(x, fsdp_sharding(np.shape(x), mesh, axis=fsdp_axis)), tree)

    root = pathlib.Path(directory)
    saved: dict[int, SavedStep] = {}
    handler = ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)
    item_handlers: Any = handler if layout == "standard" else {item: handler, "metadata": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(root, item_handlers=item_handlers) as manager:
        for step in sorted(steps):
            params = _params_for_step(base_params, step)
            batch_stats = _params_for_step(base_stats, step)
            # One real Adam update, so mu/nu hold non-trivial values distinct from params.
            grads = jax.tree.map(lambda p: np.float32(0.5) * p, params)
            _, opt_state = tx.update(grads, tx.init(params), params)
            opt_state = jax.device_get(opt_state)
            device_state = {
                "params": put(params),
                "batch_stats": put(batch_stats),
                "opt_state": put(opt_state),
                "step": np.int32(step),
            }
            state: Any = device_state
            if state_kind == "train_state":
                state = BatchStatsTrainState(
                    step=device_state["step"],
                    apply_fn=model.apply,
                    params=device_state["params"],
                    tx=tx,
                    opt_state=device_state["opt_state"],
                    batch_stats=device_state["batch_stats"],
                )
            if layout == "composite":
                args: ocp.args.CheckpointArgs = ocp.args.Composite(
                    **{item: ocp.args.StandardSave(state), "metadata": ocp.args.JsonSave({"step": step})}
                )
                item_name = item
            else:
                args = ocp.args.StandardSave(state)
                item_name = "default"
            if not manager.save(step, args=args):
                raise ValueError(f"step {step} was not saved: {root} already holds a newer step")
            manager.wait_until_finished()
            saved[step] = SavedStep(
                step=step,
                path=root / str(step),
                item=item_name,
                params=params,
                batch_stats=batch_stats,
                opt_state=opt_state,
            )
    return saved
