"""`EvalState`: what one evaluation needs of a train state (no optimizer state).

    state = EvalState.create(apply_fn=model.apply, params=params, rng=jax.random.key(0))
    state = EvalState.from_train_state(train_state=train_state)  # live state inside training
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import struct


class EvalState(struct.PyTreeNode):
    """Params, mutable collections and rng of one model version.

    Attributes:
      step: training step the params belong to.
      rng: base key; each batch uses `fold_in(rng, batch_index)` so batches differ and runs repeat.
      apply_fn: usually `module.apply`; static (not a pytree leaf).
      params: the params subtree.
      mutable_variables: other collections (e.g. {"batch_stats": ...}) or None.
    """

    step: int | jax.Array
    rng: jax.Array
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    params: Any = struct.field(pytree_node=True)
    mutable_variables: Any = None

    @classmethod
    def from_train_state(cls, *, train_state: Any, rng: jax.Array | None = None) -> EvalState:
        """Builds an EvalState from a flax TrainState-like object (or a dict with the same keys).

        `mutable_variables`, `batch_stats` and `rng` are taken when the train state has them.
        """
        get = train_state.get if isinstance(train_state, dict) else (lambda k, d=None: getattr(train_state, k, d))
        mutable = get("mutable_variables")
        if mutable is None and get("batch_stats") is not None:
            mutable = {"batch_stats": get("batch_stats")}
        rng = get("rng") if rng is None else rng
        return cls(
            step=get("step", 0),
            apply_fn=get("apply_fn"),
            params=get("params"),
            mutable_variables=mutable,
            rng=jax.random.key(0) if rng is None else rng,
        )

    @classmethod
    def create(cls, *, apply_fn: Callable[..., Any], params: Any, **kwargs: Any) -> EvalState:
        """Builds an EvalState; `step` defaults to 0 and `rng` to key(0)."""
        kwargs.setdefault("step", 0)
        kwargs.setdefault("rng", jax.random.key(0))
        return cls(apply_fn=apply_fn, params=params, **kwargs)
