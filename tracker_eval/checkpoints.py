"""Lists finalized Orbax checkpoints and restores only what evaluation needs, onto the eval mesh.

A CheckpointManager root holds `<root>/<step>/<item>/...`; a training job's train state item holds
`params`, `opt_state`, `step` and maybe `batch_stats`. Evaluation reads the params subtree and the
named mutable collections and never the optimizer state, straight into the eval mesh's shardings.

    steps = finalized_steps("/ckpts/run1")
    params, extra = restore_eval_variables(
        "/ckpts/run1", steps[-1], item="state", mutable=("batch_stats",),
        shardings_for=lambda tree: jax.tree.map(lambda _: replicated, tree),
    )
    model.apply({"params": params, **extra}, batch)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from tracker_eval.errors import ConfigError

# Written by every CheckpointManager save; names each item and the handler that wrote it.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
# Written by the PyTree/Standard handlers into each pytree item.
_PYTREE_METADATA_FILE = "_METADATA"


class CheckpointError(Exception):
    """A checkpoint step could not be read; not the user's configuration (that is `ConfigError`).

    Attributes:
        step: The checkpoint step.
        path: The step directory.
    """

    def __init__(self, message: str, *, step: int, path: str) -> None:
        super().__init__(message)
        self.step = step
        self.path = path


class CorruptCheckpointError(CheckpointError):
    """The step directory exists but its files are missing, truncated or unreadable: mark it failed."""


class CheckpointVanishedError(CheckpointError):
    """The step directory was deleted (e.g. by checkpoint retention) before or during the restore: skip it."""


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _finalized_by_rename(root: epath.Path) -> bool:
    # Orbax decides per storage how a step is finalized: on local and POSIX-like storage by an
    # atomic rename from `<step>.orbax-checkpoint-tmp`, on GCS by a commit_success.txt file.
    path_cls = ocp.path.atomicity_defaults.get_default_temporary_path_class(root)
    return path_cls is ocp.path.atomicity.AtomicRenameTemporaryPath


def finalized_steps(checkpoint_dir: str | os.PathLike[str]) -> list[int]:
    """Lists the finalized steps under a CheckpointManager root, oldest first.

    Applies Orbax's own finalization rule for the storage at hand. Where finalization is an atomic
    rename (local disks, most mounted filesystems), a step directory is final once its name is a
    plain step number, so one directory listing decides every step (~1 ms for 1,000 steps, where
    `ocp.utils.checkpoint_steps` takes ~1 s because it checks each step in its own event loop).
    Elsewhere (GCS: `commit_success.txt`) Orbax's per-step check is used. In-progress
    `<step>.orbax-checkpoint-tmp*` directories are never listed. Steps use Orbax's default name
    format (`<root>/<step>`, no prefix).

    Args:
        checkpoint_dir: The CheckpointManager root, a local path or any URL epath supports.

    Returns:
        Sorted finalized steps; [] when the directory does not exist yet (training has not
        written its first checkpoint) or holds no finalized step.

    Raises:
        ConfigError: `checkpoint_dir` is a file, or is itself a step or item directory rather
            than the root that holds the step directories.
    """
    root = epath.Path(checkpoint_dir)
    if _is_local(root) and _finalized_by_rename(root):
        try:
            with os.scandir(os.fspath(root)) as entries:
                # DirEntry.is_dir() comes from the directory listing itself: no stat per step.
                listed = {e.name: e.is_dir() for e in entries}
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise ConfigError(
                f"checkpoint_dir {os.fspath(root)!r} is a file; set checkpoint_dir to the CheckpointManager "
                "root directory that holds one <step>/ directory per checkpoint"
            ) from None
        names = set(listed)
        steps = sorted(int(n) for n, is_dir in listed.items() if is_dir and n.isdigit())
    else:
        if not root.exists():
            return []
        if not root.is_dir():
            raise ConfigError(
                f"checkpoint_dir {os.fspath(root)!r} is a file; set checkpoint_dir to the CheckpointManager "
                "root directory that holds one <step>/ directory per checkpoint"
            )
        names = {p.name for p in root.iterdir()}
        steps = sorted(int(p.name) for p in ocp.step.checkpoint_steps_paths(root) if p.name.isdigit())
    if not steps and (_STEP_METADATA_FILE in names or _PYTREE_METADATA_FILE in names):
        is_step = _STEP_METADATA_FILE in names
        kind = "one checkpoint step" if is_step else "one checkpoint item"
        likely_root = root.parent if is_step else root.parent.parent
        raise ConfigError(
            f"checkpoint_dir {os.fspath(root)!r} looks like {kind}, not a CheckpointManager root; set "
            f"checkpoint_dir to the directory that holds the <step>/ directories (likely {os.fspath(likely_root)!r})"
        )
    return steps


def _step_dir(checkpoint_dir: str | os.PathLike[str], step: int) -> epath.Path:
    return epath.Path(checkpoint_dir) / str(int(step))


def _require_step(step_dir: epath.Path, step: int) -> None:
    if not step_dir.is_dir():
        raise CheckpointVanishedError(
            f"checkpoint step {step} no longer exists at {os.fspath(step_dir)} (deleted, e.g. by retention)",
            step=step,
            path=os.fspath(step_dir),
        )


def _item_handlers(step_dir: epath.Path) -> dict[str, str]:
    """{item: handler class name} from the step metadata, else from the item directories."""
    try:
        recorded = json.loads((step_dir / _STEP_METADATA_FILE).read_text()).get("item_handlers")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, Mapping):
        return {str(name): str(handler).rsplit(".", 1)[-1] for name, handler in recorded.items()}
    # Checkpoints written without a CheckpointManager have no step metadata: each subdirectory
    # is an item and a `_METADATA` file marks a pytree one.
    return {
        p.name: ("PyTreeCheckpointHandler" if (p / _PYTREE_METADATA_FILE).exists() else "unknown")
        for p in step_dir.iterdir()
        if p.is_dir() and not p.name.startswith(("_", "."))
    }


def _is_pytree(handler: str) -> bool:
    # StandardCheckpointHandler writes the PyTreeCheckpointHandler format.
    return handler.endswith(("PyTreeCheckpointHandler", "StandardCheckpointHandler"))


def _resolve_item(item: str | None, step_dir: epath.Path, step: int) -> str:
    handlers = _item_handlers(step_dir)
    listing = ", ".join(f"{n} ({h})" for n, h in sorted(handlers.items())) or "no items"
    where = f"step {step} at {os.fspath(step_dir)}"
    if item is None:
        candidates = sorted(name for name, handler in handlers.items() if _is_pytree(handler))
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ConfigError(
                f"checkpoint.item is null but {where} holds no pytree item ({listing}); point "
                "checkpoint_dir at checkpoints saved with StandardSave/PyTreeSave"
            )
        raise ConfigError(
            f"checkpoint.item is null but {where} holds several pytree items: {', '.join(candidates)} "
            f"(all items: {listing}); set checkpoint.item to the one holding the train state"
        )
    if item not in handlers:
        raise ConfigError(
            f"checkpoint.item {item!r} not found in {where}; its items are: {listing}; set "
            "checkpoint.item to one of them (null picks the only pytree item)"
        )
    if not _is_pytree(handlers[item]):
        raise ConfigError(
            f"checkpoint.item {item!r} in {where} is not a pytree item ({listing}); set checkpoint.item "
            "to the item saved with StandardSave/PyTreeSave"
        )
    return item


def _split_path(path: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[./]", path) if part)


def _children(node: Any) -> dict[str, Any] | None:
    if isinstance(node, Mapping):
        return {str(k): v for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return {str(i): v for i, v in enumerate(node)}
    return None


def _keys(node: Any) -> str:
    children = _children(node)
    return ", ".join(sorted(children)) if children else "no keys"


def _lookup(tree: Any, keys: Sequence[str]) -> tuple[Any, int]:
    """Returns (subtree, -1) if found, else (deepest node reached, index of the missing key)."""
    node = tree
    for depth, key in enumerate(keys):
        children = _children(node)
        if children is None or key not in children:
            return node, depth
        node = children[key]
    return node, -1


def _read_tree_metadata(item_dir: epath.Path, *, step: int, step_dir: epath.Path) -> Any:
    try:
        if not (item_dir / _PYTREE_METADATA_FILE).exists():
            # Checked here: Orbax's own failure path for it leaves a stray event-loop callback.
            raise FileNotFoundError(f"{os.fspath(item_dir / _PYTREE_METADATA_FILE)} is missing")
        handler = ocp.PyTreeCheckpointHandler()
        try:
            metadata = handler.metadata(item_dir)
        finally:
            handler.close()
    except Exception as e:  # noqa: BLE001 - any read failure means missing or damaged files
        raise _read_failure(e, step=step, step_dir=step_dir, what="metadata") from e
    return getattr(metadata, "tree", metadata)


class _Leaf:
    """A leaf of the light tree: only its array name, until its shape and dtype are needed."""

    def __init__(self, name: str, value_type: str | None) -> None:
        self.name = name
        self.value_type = value_type


def _light_tree(item_dir: epath.Path) -> tuple[Any, dict[str, Any]]:
    """The item's tree structure from its `_METADATA` file alone (one small JSON read).

    Orbax's own `metadata()` opens every array of the item (the optimizer state's too) to learn
    shapes and dtypes; evaluation needs them for the params subtree only. Sequence nodes stay
    lists, so a restore target built from this tree matches the saved structure.
    """
    meta = json.loads((item_dir / _PYTREE_METADATA_FILE).read_text())
    root: dict[str, Any] = {}
    sequences: set[int] = set()
    for entry in meta["tree_metadata"].values():
        keys = entry["key_metadata"]
        value_type = entry["value_metadata"].get("value_type")
        node = root
        for depth, key in enumerate(keys):
            if key["key_type"] == 1:
                sequences.add(id(node))
            last = depth == len(keys) - 1
            leaf = _Leaf(".".join(str(k["key"]) for k in keys), value_type) if last else {}
            node = node.setdefault(str(key["key"]), leaf)
    return _with_sequences(root, sequences), meta


def _with_sequences(node: Any, sequences: set[int]) -> Any:
    if not isinstance(node, dict):
        return node
    children = {k: _with_sequences(v, sequences) for k, v in node.items()}
    if id(node) in sequences:
        return [children[str(i)] for i in range(len(children))]
    return children


def _fill_shapes(subtree: Any, *, item_dir: epath.Path, meta: Mapping[str, Any]) -> Any:
    """Shapes and dtypes of just this subtree's arrays, opened concurrently with TensorStore."""
    import tensorstore as ts  # noqa: PLC0415 - Orbax's own storage layer

    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    base = os.fspath(item_dir)
    leaves, treedef = jax.tree.flatten(subtree, is_leaf=lambda x: isinstance(x, _Leaf))
    if not all(isinstance(leaf, _Leaf) and leaf.value_type in ("jax.Array", "np.ndarray") for leaf in leaves):
        raise ValueError("non-array leaves need Orbax's own reader")

    def spec(name: str) -> dict[str, Any]:
        if meta.get("use_ocdbt", True):
            return {"driver": driver, "kvstore": {"driver": "ocdbt", "base": f"file://{base}/", "path": name}}
        return {"driver": driver, "kvstore": {"driver": "file", "path": f"{base}/{name}"}}

    opened = [ts.open(spec(leaf.name), open=True, read=True) for leaf in leaves]
    structs = []
    for future in opened:
        store = future.result()
        structs.append(jax.ShapeDtypeStruct(tuple(store.shape), store.dtype.numpy_dtype))
    return jax.tree.unflatten(treedef, structs)


def _light_abstract(
    item_dir: epath.Path, wanted: Sequence[tuple[str, str]], *, where: dict[str, Any]
) -> dict[str, Any] | None:
    """ShapeDtypeStructs of the wanted subtrees, reading only their own arrays' metadata.

    Returns None when the light path cannot serve (missing or unusual metadata, non-array leaves,
    unreadable arrays, a remote path): the caller then uses Orbax's full reader, which also gives
    the precise corrupt/vanished errors. A wrong path is a `ConfigError` listing the keys either way.
    """
    if not _is_local(item_dir):
        return None
    try:
        tree, meta = _light_tree(item_dir)
    except Exception:  # noqa: BLE001 - anything unexpected: let Orbax's reader decide
        return None
    found = {path: _find_subtree(tree, path, config_key=key, **where) for path, key in wanted}
    try:
        return {path: _fill_shapes(subtree, item_dir=item_dir, meta=meta) for path, subtree in found.items()}
    except Exception:  # noqa: BLE001
        return None


def _read_failure(error: Exception, *, step: int, step_dir: epath.Path, what: str) -> CheckpointError:
    path = os.fspath(step_dir)
    # Retention deletes a whole step directory: its absence afterwards explains any read error.
    if not step_dir.exists():
        return CheckpointVanishedError(
            f"checkpoint step {step} at {path} was deleted while its {what} was being read", step=step, path=path
        )
    detail = " ".join(str(error).split())[:300]
    return CorruptCheckpointError(
        f"checkpoint step {step} at {path} is corrupt or incomplete: reading its {what} failed with "
        f"{type(error).__name__}: {detail}",
        step=step,
        path=path,
    )


def _find_subtree(tree: Any, path: str, *, config_key: str, item: str, step: int, step_dir: epath.Path) -> Any:
    keys = _split_path(path)
    node, missing = _lookup(tree, keys)
    if keys and missing < 0:
        return node
    found_at = "/".join(keys[:missing]) if missing > 0 else ""
    deeper = f"; {found_at!r} holds: {_keys(node)}" if found_at else ""
    remedy = (
        "set checkpoint.mutable to a subset of those collections, or [] for none"
        if config_key == "checkpoint.mutable"
        else "set checkpoint.params to the path of the params subtree (dots or slashes)"
    )
    raise ConfigError(
        f"{config_key} {path!r} not found in item {item!r} of step {step} at {os.fspath(step_dir)}: "
        f"the item's top-level keys are: {_keys(tree)}{deeper}; {remedy}"
    )


def _abstract(subtree: Any) -> Any:
    def leaf(meta: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype)

    return jax.tree.map(leaf, subtree)


def _with_shardings(abstract: Any, shardings: Any, *, name: str) -> Any:
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    try:
        sharding_leaves = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"shardings_for returned a tree that does not match the {name} tree: {e}") from e
    targets = []
    for (key_path, sds), sharding in zip(paths_and_leaves, sharding_leaves, strict=True):
        where = f"{name}{jax.tree_util.keystr(key_path)}"
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(f"shardings_for returned {sharding!r} for {where}; expected a jax.sharding.Sharding")
        try:
            sharding.shard_shape(sds.shape)
        except ValueError as e:
            # Caught here so a placement mistake is not mistaken for a damaged checkpoint later.
            raise ConfigError(
                f"{where} of shape {sds.shape} cannot be placed with {sharding}: {e}; change the params "
                "sharding rule or the mesh axis sizes"
            ) from e
        targets.append(jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding))
    return jax.tree_util.tree_unflatten(treedef, targets)


def _nest(keys: Sequence[str], value: Any, into: dict[str, Any]) -> None:
    overlap = ConfigError(
        f"checkpoint.params and checkpoint.mutable overlap at {'/'.join(keys)!r}; name each subtree once"
    )
    node = into
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise overlap
    if keys[-1] in node:
        raise overlap
    node[keys[-1]] = value


def restore_eval_variables(
    checkpoint_dir: str | os.PathLike[str],
    step: int,
    *,
    item: str | None,
    params_path: str = "params",
    mutable: Sequence[str] = (),
    shardings_for: Callable[[Any], Any],
) -> tuple[Any, dict[str, Any]]:
    """Restores only the params subtree and the named mutable collections, onto target shardings.

    Shapes and dtypes come from the checkpoint's metadata (no array data read); `shardings_for`
    places them on the eval mesh; Orbax then reads just those arrays, resharding on the fly, so a
    checkpoint written on another device count or mesh restores as well. The optimizer state and
    everything else in the item is never read.

    Args:
        checkpoint_dir: The CheckpointManager root.
        step: A finalized step (see `finalized_steps`).
        item: The item holding the train state (`state` for `Composite(state=StandardSave(...))`,
            `default` for a plain `StandardSave(...)`); None picks the only pytree item.
        params_path: Path inside the item to the params subtree, dots or slashes (`params`,
            `params.params`, `model/params`).
        mutable: Paths inside the item of other collections to restore, e.g. ("batch_stats",).
        shardings_for: Maps a tree of `jax.ShapeDtypeStruct` (no sharding) to a matching tree of
            `jax.sharding.Sharding`, or to one Sharding for every leaf. Called once for the params
            and once per mutable collection.

    Returns:
        (params, {name: collection}) as trees of jax.Array with the requested shardings; the keys
        are the `mutable` entries as given.

    Raises:
        ConfigError: `item`, `params_path` or a `mutable` entry is not in the checkpoint (the
            message lists what is there), or a sharding cannot hold its array.
        ValueError: `shardings_for` returned a tree that does not match its input.
        CheckpointVanishedError: The step directory is gone (deleted before or during the restore).
        CorruptCheckpointError: The step exists but its metadata or array files are missing,
            truncated or unreadable.
    """
    step_dir = _step_dir(checkpoint_dir, step)
    _require_step(step_dir, step)
    try:
        item_name = _resolve_item(item, step_dir, step)
    except OSError as e:
        raise _read_failure(e, step=step, step_dir=step_dir, what="item list") from e
    item_dir = step_dir / item_name
    where = {"item": item_name, "step": step, "step_dir": step_dir}
    wanted = [("params", params_path, "checkpoint.params"), *((n, n, "checkpoint.mutable") for n in mutable)]
    abstracts = _light_abstract(item_dir, [(path, key) for _, path, key in wanted], where=where)
    if abstracts is None:  # a layout the light path does not know: Orbax's full metadata read
        tree = _read_tree_metadata(item_dir, step=step, step_dir=step_dir)
        abstracts = {path: _abstract(_find_subtree(tree, path, config_key=key, **where)) for _, path, key in wanted}

    target: dict[str, Any] = {}
    for name, path, _ in wanted:
        abstract = abstracts[path]
        _nest(_split_path(path), _with_shardings(abstract, shardings_for(abstract), name=name), target)

    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    # A fresh Checkpointer on the item directory: no per-manager handler registry to clash with
    # (FIELD-NOTES: "does not match with any registered handler") and no scan of every step,
    # which a CheckpointManager does on construction.
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(
                item_dir,
                args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
            )
    except Exception as e:  # noqa: BLE001 - shardings were validated above; what is left is the files
        raise _read_failure(e, step=step, step_dir=step_dir, what="arrays") from e

    params, _ = _lookup(restored, _split_path(params_path))
    collections = {name: _lookup(restored, _split_path(name))[0] for name in mutable}
    return params, collections
