"""Human-readable listing of a checkpoint step's items and subtrees, from metadata only.

    print(describe_checkpoint("/ckpts/run1", 20, depth=1))

Kept apart from `tracker_eval.checkpoints.items` and `.restore` because only people read it: error
messages that must say what a checkpoint holds, logs and debugging.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax

from tracker_eval.checkpoints.items import is_pytree, item_handlers, require_step, step_path
from tracker_eval.checkpoints.listing import read_step_names
from tracker_eval.checkpoints.roots import StepNames
from tracker_eval.checkpoints.tree import _children, _read_tree_metadata


def _summarize(node: Any) -> str:
    leaves = jax.tree.leaves(node)
    if _children(node) is None and len(leaves) == 1:
        return f"{leaves[0].dtype}{list(leaves[0].shape)}"
    nbytes = sum(math.prod(m.shape) * m.dtype.itemsize for m in leaves if hasattr(m, "shape"))
    size = f"{nbytes / 1e3:.1f} kB" if nbytes < 1e6 else f"{nbytes / 1e6:.1f} MB"
    return f"{len(leaves)} arrays, {size}"


def describe_checkpoint(
    checkpoint_dir: str | os.PathLike[str], step: int, *, depth: int = 2, step_names: StepNames | None = None
) -> str:
    """Lists a step's items and, for pytree items, their subtrees, for error messages and logs.

    Reads only metadata files. Example output with depth=1:

        /ckpts/run1/20
          metadata [JsonCheckpointHandler]
          state [StandardCheckpointHandler]
            batch_stats: 4 arrays, 0.8 kB
            opt_state: 21 arrays, 35.2 kB
            params: 10 arrays, 17.6 kB
            step: int32[]

    Args:
        checkpoint_dir: The CheckpointManager root.
        step: The step to describe.
        depth: How many levels of each pytree item to list (1: only its top-level keys).
        step_names: How the root names its step folders; None detects it.

    Returns:
        A multi-line listing.

    Raises:
        CheckpointVanishedError: The step directory does not exist.
        CorruptCheckpointError: A pytree item's metadata cannot be read.
    """
    step_dir = step_path(checkpoint_dir, step, step_names=read_step_names(checkpoint_dir, step_names=step_names))
    require_step(step_dir, step)
    lines = [os.fspath(step_dir)]
    for name, handler in sorted(item_handlers(step_dir).items()):
        lines.append(f"  {name} [{handler}]")
        if is_pytree(handler):
            tree = _read_tree_metadata(step_dir / name, step=step, step_dir=step_dir)
            _describe_node(tree, indent=4, depth=depth, lines=lines)
    return "\n".join(lines)


def _describe_node(node: Any, *, indent: int, depth: int, lines: list[str]) -> None:
    children = _children(node) or {}
    for key in sorted(children):
        child = children[key]
        grandchildren = _children(child)
        if depth > 1 and grandchildren:
            lines.append(f"{' ' * indent}{key}/")
            _describe_node(child, indent=indent + 2, depth=depth - 1, lines=lines)
        else:
            lines.append(f"{' ' * indent}{key}: {_summarize(child)}")
