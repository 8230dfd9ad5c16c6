"""What an Orbax checkpoint item holds: its tree, the shapes of a subtree, and read errors.

    tree, meta = _light_tree(item_dir)                    # structure from one small JSON file
    abstract = _light_abstract(item_dir, [("params", "checkpoint.params")], where=...)
    tree = _read_tree_metadata(item_dir, step=..., step_dir=...)   # Orbax's full reader

Restore targets need shapes and dtypes of the params subtree only; Orbax's own `metadata()` opens
every array of the item, the optimizer state's too. The light path reads the tree from `_METADATA`
and opens just the wanted arrays with TensorStore; Orbax's reader stays the fallback and the source
of the corrupt/vanished errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from tracker_eval.checkpoints.roots import PYTREE_METADATA_FILE
from tracker_eval.errors import ConfigError, one_line

LOG = logging.getLogger("tracker_eval")

# Written last into each step (and item) Orbax saves where there is no atomic rename (GCS).
COMMIT_MARKER = "commit_success.txt"


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


class StorageUnavailableError(Exception):
    """The checkpoint storage did not answer (server down, network, HTTP 5xx/429, credentials not
    refreshed): nothing is known about the checkpoints, so try again later rather than judge them."""


class StorageLocationMissingError(StorageUnavailableError):
    """The storage answered that the location's container (a GCS bucket) does not exist.

    A watcher waits for it like for any outage (the bucket may be created later); a one-shot
    command (`tracker-eval eval`) reports it as the `checkpoint_dir` mistake it most likely is."""


class CheckpointUnreachableError(CheckpointError, StorageUnavailableError):
    """A step's files could not be read and the storage could not even say whether the step still
    exists: not the checkpoint's fault, so the attempt is not counted against it."""


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def step_exists(step_dir: epath.Path) -> bool:
    """Whether a finalized step is still there; raises when the storage does not answer.

    On GCS the step's `commit_success.txt` decides, as it did when the step was listed: deletion
    may remove it before or after the data. `exists()` is used, never `is_dir()`, whose fsspec
    implementation answers False for any error, so a server outage would pass for a deleted step.
    """
    if os.fspath(step_dir).startswith("gs://"):
        return (step_dir / COMMIT_MARKER).exists()
    return step_dir.exists()


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
        if not (item_dir / PYTREE_METADATA_FILE).exists():
            # Checked here: Orbax's own failure path for it leaves a stray event-loop callback.
            raise FileNotFoundError(f"{os.fspath(item_dir / PYTREE_METADATA_FILE)} is missing")
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
    meta = json.loads((item_dir / PYTREE_METADATA_FILE).read_text())
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
        LOG.debug("tracker-eval: %s is remote; its shapes come from Orbax's full metadata read", item_dir)
        return None
    try:
        tree, meta = _light_tree(item_dir)
    except Exception as e:  # noqa: BLE001 - anything unexpected: let Orbax's reader decide
        _fell_back(item_dir, "its tree", e)
        return None
    found = {path: _find_subtree(tree, path, config_key=key, **where) for path, key in wanted}
    try:
        return {path: _fill_shapes(subtree, item_dir=item_dir, meta=meta) for path, subtree in found.items()}
    except Exception as e:  # noqa: BLE001
        _fell_back(item_dir, "the wanted arrays' shapes", e)
        return None


def _fell_back(item_dir: epath.Path, what: str, error: Exception) -> None:
    # Said (with --verbose) because the fallback reads every array's metadata, the optimizer
    # state's too: a layout that always lands here costs time on every checkpoint.
    LOG.debug("tracker-eval: reading %s of %s directly failed (%s: %s); using Orbax's full metadata read",
              what, item_dir, type(error).__name__, one_line(error, limit=200))


def _read_failure(error: Exception, *, step: int, step_dir: epath.Path, what: str) -> CheckpointError:
    path = os.fspath(step_dir)
    detail = one_line(error, limit=300)
    # Retention deletes a whole step directory: its absence afterwards explains any read error.
    try:
        gone = not step_exists(step_dir)
    except Exception as probe_error:  # noqa: BLE001 - whatever the storage raised, it did not answer
        return CheckpointUnreachableError(
            f"checkpoint step {step} at {path}: reading its {what} failed ({type(error).__name__}: {detail}) "
            f"and the storage did not answer whether the step exists ({type(probe_error).__name__}: "
            f"{one_line(probe_error, limit=200)})",
            step=step,
            path=path,
        )
    if gone:
        return CheckpointVanishedError(
            f"checkpoint step {step} at {path} was deleted while its {what} was being read", step=step, path=path
        )
    return CorruptCheckpointError(
        f"checkpoint step {step} at {path} is corrupt or incomplete: reading its {what} failed with "
        f"{type(error).__name__}: {detail}",
        step=step,
        path=path,
    )


def _find_subtree(tree: Any, path: str, *, config_key: str, item: str, step: int, step_dir: epath.Path) -> Any:
    keys = _split_path(path)
    node, missing = _lookup(tree, keys)
    if missing < 0:  # found; no keys is the item's root
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


