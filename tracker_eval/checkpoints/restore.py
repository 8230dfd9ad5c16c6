"""Restores only what evaluation needs from a checkpoint step, straight onto the eval mesh.

A CheckpointManager root holds `<root>/<step>/<item>/...`; a training job's train state item holds
`params`, `opt_state`, `step` and maybe `batch_stats`. Evaluation reads the params subtree and the
named mutable collections and never the optimizer state, straight into the eval mesh's shardings.

    params, extra = restore_eval_variables(
        "/ckpts/run1", 300, item="state", mutable=("batch_stats",),
        shardings_for=lambda tree: jax.tree.map(lambda _: replicated, tree),
    )
    model.apply({"params": params, **extra}, batch)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from tracker_eval.checkpoints.boxes import has_boxes, rebox, unbox
from tracker_eval.checkpoints.items import require_step, resolve_item, step_path
from tracker_eval.checkpoints.roots import DEFAULT_NAMES, StepNames
from tracker_eval.checkpoints.tree import (
    _abstract,
    _find_subtree,
    _light_abstract,
    _lookup,
    _read_failure,
    _read_tree_metadata,
    _split_path,
)
from tracker_eval.errors import ConfigError


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
    if not keys:
        raise ConfigError(
            "checkpoint.params is null (the item's root) and checkpoint.mutable names collections inside it; "
            "set checkpoint.params to the params subtree's path, or checkpoint.mutable to []"
        )
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
    params_path: str | None = "params",
    mutable: Sequence[str] = (),
    shardings_for: Callable[[Any], Any],
    step_names: StepNames = DEFAULT_NAMES,
) -> tuple[Any, dict[str, Any]]:
    """Restores only the params subtree and the named mutable collections, onto target shardings.

    Shapes and dtypes come from the checkpoint's metadata (no array data read); `shardings_for`
    places them on the eval mesh; Orbax then reads just those arrays, resharding on the fly, so a
    checkpoint written on another device count or mesh restores as well. The optimizer state and
    everything else in the item is never read. Flax's partitioning boxes (leaves saved as
    `<path>/value`) are taken off (`tracker_eval.checkpoints.boxes`): `shardings_for` sees, and
    the caller gets, plain arrays.

    Args:
        checkpoint_dir: The CheckpointManager root.
        step: A finalized step (see `finalized_steps`).
        item: The item holding the train state (`state` for `Composite(state=StandardSave(...))`,
            `default` for a plain `StandardSave(...)`); None picks the only pytree item.
        params_path: Path inside the item to the params subtree, dots or slashes (`params`,
            `params.params`, `model/params`); None for the item's root (the item is the params).
        mutable: Paths inside the item of other collections to restore, e.g. ("batch_stats",).
        shardings_for: Maps a tree of `jax.ShapeDtypeStruct` (no sharding) to a matching tree of
            `jax.sharding.Sharding`, or to one Sharding for every leaf. Called once for the params
            and once per mutable collection.
        step_names: How the root names its step folders (`tracker_eval.checkpoints.roots`).

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
    step_dir = step_path(checkpoint_dir, step, step_names=step_names)
    params_path = params_path or ""  # the item's root
    require_step(step_dir, step)
    try:
        item_name = resolve_item(item, step_dir, step)
    except OSError as e:
        raise _read_failure(e, step=step, step_dir=step_dir, what="item list") from e
    item_dir = step_dir / item_name
    where = {"item": item_name, "step": step, "step_dir": step_dir}
    wanted = [("params", params_path, "checkpoint.params"), *((n, n, "checkpoint.mutable") for n in mutable)]
    abstracts = _light_abstract(item_dir, [(path, key) for _, path, key in wanted], where=where)
    if abstracts is None:  # a layout the light path does not know: Orbax's full metadata read
        tree = _read_tree_metadata(item_dir, step=step, step_dir=step_dir)
        abstracts = {path: _abstract(_find_subtree(tree, path, config_key=key, **where)) for _, path, key in wanted}

    target: Any = {}
    for name, path, _ in wanted:
        boxed = abstracts[path]
        abstract = unbox(boxed)
        placed = rebox(_with_shardings(abstract, shardings_for(abstract), name=name), like=boxed)
        if not _split_path(path) and not mutable:
            target = placed  # the params are the whole item
        else:
            _nest(_split_path(path), placed, target)

    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    # The handler itself on the item directory: no per-manager handler registry to clash with
    # (FIELD-NOTES: "does not match with any registered handler"), no scan of every step (a
    # CheckpointManager's construction), and no Checkpointer: its restore ends in a barrier that
    # is a device collective across processes, so a process that could not read its shards would
    # leave the others waiting there forever. Each process reads its own shards; the evaluation's
    # agreement (evaluation/agreement.py) tells every process whether all of them succeeded.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        restored = handler.restore(
            item_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
    except Exception as e:  # noqa: BLE001 - shardings were validated above; what is left is the files
        raise _read_failure(e, step=step, step_dir=step_dir, what="arrays") from e
    finally:
        handler.close()

    params, _ = _lookup(restored, _split_path(params_path))
    collections = {name: _lookup(restored, _split_path(name))[0] for name in mutable}
    if has_boxes(params) or any(has_boxes(c) for c in collections.values()):
        params, collections = unbox(params), {name: unbox(c) for name, c in collections.items()}
    return params, collections
