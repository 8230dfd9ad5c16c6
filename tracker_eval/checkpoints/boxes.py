"""Flax's partitioning boxes in saved params: `{"kernel": {"value": array}}` read as `{"kernel": array}`.

    unbox({"dense": {"kernel": {"value": w}}})     # {"dense": {"kernel": w}}
    rebox(shardings_of_unboxed, like=boxed_tree)   # the same leaves, in the saved tree's shape

A linen model whose params are `nn.Partitioned` (or `nn.LogicallyPartitioned`) boxes saves each
leaf as `<path>/value`: the box is a pytree whose only child is `value`, and its `names`/`mesh`
are static, so not saved. `nnx.state(model)` saves every variable the same way. A model expects
plain arrays (what `flax.linen.meta.unbox` and `nnx.State.to_pure_dict` give), so a mapping whose
only key is `value` is read as that value. Shapes are kept: a stacked parameter (xlstm-jax's
tensor-parallel norm scales, shape (1, d)) stays stacked, and the model decides how to read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

BOX_KEY = "value"


def is_box(node: Any) -> bool:
    """Whether `node` is a saved box: a mapping whose only key is `value`."""
    return isinstance(node, Mapping) and len(node) == 1 and BOX_KEY in node


def unbox(tree: Any) -> Any:
    """`tree` with every box replaced by its value (leaves are kept as they are)."""
    if is_box(tree):
        return unbox(tree[BOX_KEY])
    if isinstance(tree, Mapping):
        return {key: unbox(child) for key, child in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(unbox(child) for child in tree)
    return tree


def has_boxes(tree: Any) -> bool:
    """Whether any box is in `tree`."""
    if is_box(tree):
        return True
    if isinstance(tree, Mapping):
        return any(has_boxes(child) for child in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(has_boxes(child) for child in tree)
    return False


def rebox(unboxed: Any, *, like: Any) -> Any:
    """The leaves of `unboxed` (a tree shaped like `unbox(like)`) in the tree shape of `like`.

    Unboxing replaces a one-child subtree by its child, so both trees flatten to their leaves in
    the same order.
    """
    return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(unboxed))
