"""Device mesh from the config, batch placement with padding and mask, and params placement.

    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    placer = BatchPlacer(mesh, global_batch_size=64)
    batch, mask, host_mask = placer.place({"x": x_np, "y": y_np})  # short batches padded, masked
    params = place_params(params, mesh, rule="fsdp")

The global batch is split over (data, fsdp); a batch size not divisible by that is padded up to
the next multiple instead of failing, and the padding rows are masked out of every metric.

A model that calls collectives over its own axis names (xlstm-jax: `dp`, `fsdp`, `pp`, `tp`) gets
a mesh with those names, and the config says which of them shard the batch:

    mesh = make_mesh(MeshConfig(axes={"dp": 1, "fsdp": 2, "tp": 2}, batch_axes=("dp", "fsdp")))
    batch_axes(mesh)    # ("dp", "fsdp"): what every stage splits the batch over
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tracker_eval.config import MeshConfig
from tracker_eval.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# The batch axes of each mesh's axis names. Every stage (batch placement, the eval step, the
# row-by-row metrics, plug-in suites) is handed the mesh, or finds it current while tracing, and
# asks `batch_axes(mesh)`: one registry beside the mesh instead of one more argument through all.
_BATCH_AXES: dict[tuple[str, ...], tuple[str, ...]] = {AXES: BATCH_AXES}


def mesh_axes(config: MeshConfig) -> tuple[tuple[str, ...], list[int]]:
    """(axis names, sizes) the config asks for: its `axes`, else (data, fsdp, tensor)."""
    if config.axes:
        return tuple(config.axes), list(config.axes.values())
    return AXES, [config.data, config.fsdp, config.tensor]


def mesh_shape(config: MeshConfig, *, device_count: int) -> tuple[int, ...]:
    """Resolves -1 in the mesh config against `device_count`.

    Raises:
      ConfigError: when the sizes do not fit the available devices.
    """
    names, sizes = mesh_axes(config)
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise ConfigError(
                f"mesh {dict(zip(names, sizes, strict=True))} cannot fill {device_count} devices: "
                f"{device_count} is not divisible by {fixed}; change the mesh sizes"
            )
        sizes[sizes.index(-1)] = device_count // fixed
    if math.prod(sizes) > device_count:
        raise ConfigError(
            f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices but only {device_count} "
            "are available; make the mesh smaller or use -1 for one axis"
        )
    return tuple(sizes)


def make_mesh(config: MeshConfig, *, devices: list[Any] | None = None) -> Mesh:
    """Builds the mesh; a mesh smaller than the device count uses the first devices.

    Auto axis types are used on purpose: Explicit ones (jax's default in 0.10) break ordinary
    GSPMD model code such as nnx.Embed.

    Raises:
      ConfigError: the sizes do not fit the devices, or these axis names were given other batch
        axes earlier in this process.
    """
    names, _ = mesh_axes(config)
    batch = tuple(config.batch_axes) if config.axes else BATCH_AXES
    if _BATCH_AXES.setdefault(names, batch) != batch:
        raise ConfigError(
            f"mesh.batch_axes {list(batch)} differ from {list(_BATCH_AXES[names])} given to a mesh with the same "
            f"axes {list(names)} in this process; give every stream of one process the same mesh.batch_axes"
        )
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, device_count=len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    if math.prod(shape) == len(devices):
        return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices[: math.prod(shape)]).reshape(shape), names, axis_types=auto)


def batch_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The axes of `mesh` that split the batch (`mesh.batch_axes`; data and fsdp by default)."""
    names = tuple(mesh.axis_names)
    return _BATCH_AXES.get(names) or tuple(a for a in BATCH_AXES if a in names)


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts the batch is split: the product of the batch axes' sizes."""
    return math.prod(mesh.shape[axis] for axis in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the batch axes (data x fsdp), replicated over the others."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(shape: tuple[int, ...], mesh: Mesh, *, rule: str) -> NamedSharding:
    """Sharding of one parameter under `rule`.

    `fsdp` shards the largest axis divisible by the fsdp size (small or indivisible params stay
    replicated); `replicated` copies every param to every device.
    """
    fsdp = mesh.shape.get("fsdp", 1)
    if rule == "auto":
        rule = "fsdp" if fsdp > 1 else "replicated"
    if rule == "replicated" or fsdp == 1:
        return replicated(mesh)
    if rule != "fsdp":
        raise ConfigError(f"params_sharding {rule!r} is not one of auto, replicated, fsdp")
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
    if not candidates:
        return replicated(mesh)
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def shardings_for(tree: Any, mesh: Mesh, *, rule: str) -> Any:
    """Tree of shardings for a tree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda leaf: param_sharding(tuple(leaf.shape), mesh, rule=rule), tree)


def place_params(tree: Any, mesh: Mesh, *, rule: str, keep_placed: bool = True) -> Any:
    """Places params on the mesh by `rule`.

    With `keep_placed`, leaves that already live on exactly the mesh's devices (e.g. live params
    of a training step, sharded however training chose) are used where they are: no copy, no
    host round-trip; XLA adapts the eval step to their layout.
    """
    devices = set(mesh.devices.flat)

    def place(leaf: Any, sharding: NamedSharding) -> Any:
        if keep_placed and isinstance(leaf, jax.Array) and set(leaf.sharding.device_set) == devices:
            return leaf
        return put(leaf, sharding)

    return jax.tree.map(place, tree, shardings_for(tree, mesh, rule=rule))


def put(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """`leaf` with `sharding`: no copy when it already has it; works across processes too.

    Host values (identical on every process) become global arrays through a callback, because
    `jax.device_put` only reaches this process's devices.
    """
    if isinstance(leaf, jax.Array):
        if leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) and not sharding.is_fully_addressable:
            # Typed keys cannot pass through numpy: move their raw data and wrap it again.
            data = put(jax.random.key_data(leaf), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        if leaf.is_fully_addressable and not sharding.is_fully_addressable:
            leaf = np.asarray(leaf)
        else:
            return jax.device_put(leaf, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every leaf replicated on the mesh (host values must be equal on all processes)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda leaf: put(leaf, sharding), tree)


class BatchPlacer:
    """Turns host batches (this process's slice) into global, padded, masked device arrays."""

    def __init__(self, mesh: Mesh, *, global_batch_size: int) -> None:
        self.mesh = mesh
        self.sharding = batch_sharding(mesh)
        shards = batch_shards(mesh)
        self.shards = shards
        # Pad the global batch up to a multiple of the batch shards (and of the process count),
        # so every batch, the short last one included, has one shape: one compile.
        unit = math.lcm(shards, jax.process_count())
        self.global_rows = -(-global_batch_size // unit) * unit
        self.local_rows = self.global_rows // jax.process_count()
        self.batch_size = global_batch_size
        self._full_mask: jax.Array | None = None

    def place(self, batch: Any) -> tuple[Any, jax.Array, np.ndarray]:
        """Returns (global batch, device example mask, this process's host mask) for one batch.

        `batch` is any pytree of arrays with the batch axis first: a dict, a flax struct dataclass,
        a tuple. The global batch has the same structure.

        Raises:
          ValueError: when the batch has more rows than this process's slice, or ragged arrays.
        """
        if self.is_placed(batch):
            # Already global and full: placed by the caller, nothing to copy or mask.
            placed = jax.tree.map(
                lambda v: v if v.sharding.is_equivalent_to(self.sharding, v.ndim) else jax.device_put(v, self.sharding),
                batch,
            )
            return placed, self.full_mask(), np.ones(self.local_rows, bool)
        return self.to_device(*self.pad(batch))

    def is_placed(self, batch: Any) -> bool:
        """Whether every leaf is already a global device array of the full padded batch."""
        leaves = jax.tree.leaves(batch)
        return bool(leaves) and all(isinstance(v, jax.Array) and v.shape[:1] == (self.global_rows,) for v in leaves)

    def pad(self, batch: Any) -> tuple[Any, np.ndarray]:
        """This process's host arrays padded to its slice of the global batch, and its row mask.

        Raises:
          ValueError: an empty batch, ragged leading axes, or more rows than this process's slice.
        """
        paths_leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
        if not paths_leaves:
            raise ValueError(
                f"data must yield non-empty batches of arrays (a dict, dataclass or tuple), got {type(batch).__name__}"
            )
        arrays = jax.tree.map(np.asarray, batch)
        rows = {jax.tree_util.keystr(path): np.shape(leaf)[0] if np.ndim(leaf) else None for path, leaf in paths_leaves}
        counts = set(rows.values())
        if len(counts) != 1 or None in counts:
            raise ValueError(f"batch arrays must share their leading (batch) axis, got leading sizes {rows}")
        n = counts.pop()
        if n > self.local_rows:
            raise ValueError(
                f"data yielded a batch of {n} rows but this process's slice of batch_size="
                f"{self.batch_size} is at most {self.local_rows}; yield batch_size // process_count rows"
            )
        return jax.tree.map(lambda a: _pad_rows(a, self.local_rows), arrays), np.arange(self.local_rows) < n

    def to_device(self, padded: Any, host_mask: np.ndarray) -> tuple[Any, jax.Array, np.ndarray]:
        """(global batch, device mask, host mask) from this process's padded host arrays."""
        return jax.tree.map(self._to_global_one, padded), self._to_global_one(host_mask), host_mask

    def full_mask(self) -> jax.Array:
        if self._full_mask is None:
            self._full_mask = self._to_global_one(np.ones(self.local_rows, bool))
        return self._full_mask

    def _to_global_one(self, local: np.ndarray) -> jax.Array:
        if jax.process_count() == 1:
            return jax.device_put(local, self.sharding)
        global_shape = (self.global_rows,) + local.shape[1:]
        return jax.make_array_from_process_local_data(self.sharding, local, global_shape)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Pads the leading axis to `rows` by repeating the last real row (zeros if there is none).

    Repeating a real row keeps padding inputs in-distribution, so eval functions that take logs
    or divide do not produce NaN/Inf on padding (which the mask would drop anyway).
    """
    n = array.shape[0]
    if n == rows:
        return array
    if n == 0:
        return np.zeros((rows,) + array.shape[1:], array.dtype)
    return np.concatenate([array, np.repeat(array[-1:], rows - n, axis=0)], axis=0)
