"""Adapts the user's model factory (linen Module, nnx Module or apply_fn) to one calling shape.

Every eval function calls `apply_fn({"params": params}, *inputs)`, whichever kind the model is:

    adapter = adapt_model(make_model())
    logits = adapter.bind(mutable)({"params": params}, x)

For nnx the params are a pure dict (`nnx.state(model, nnx.Param).to_pure_dict()`, the form that
checkpoints hold), merged back into the module's graph inside the traced function.

A model that wraps itself in `shard_map` (as xlstm-jax's trainer wraps its model) needs the
evaluation's mesh: `build_model` passes it to a factory that takes a `mesh` argument, and the
factory runs (as the eval step is traced) with that mesh current (`jax.set_mesh`):

    model = build_model(make_model, {"config": ...}, mesh=mesh)   # make_model(config=..., mesh=mesh)
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """A model as a pure function of its variables.

    Attributes:
      kind: "linen", "nnx" or "function".
      apply_fn: (variables, *args, **kwargs) -> outputs.
      module: the original module (None for plain functions).
    """

    kind: str
    apply_fn: Callable[..., Any]
    module: Any = None

    def bind(self, mutable: Mapping[str, Any] | None) -> Callable[..., Any]:
        """apply_fn with the mutable collections (e.g. batch_stats) merged into its variables.

        Called inside the jitted step, so `mutable` is traced, never baked in as a constant.
        """
        if not mutable:
            return self.apply_fn

        def apply(variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
            return self.apply_fn({**mutable, **variables}, *args, **kwargs)

        return apply


def build_model(factory: Callable[..., Any], kwargs: Mapping[str, Any], *, mesh: jax.sharding.Mesh) -> Any:
    """Calls the model factory with `kwargs`, and `mesh=` when it takes one, with `mesh` current.

    A `mesh` in `kwargs` (model_kwargs) is the user's and wins.
    """
    try:
        takes_mesh = "mesh" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        takes_mesh = False
    extra = {"mesh": mesh} if takes_mesh and "mesh" not in kwargs else {}
    with jax.set_mesh(mesh):
        return factory(**kwargs, **extra)


def adapt_model(model: Any) -> ModelAdapter:
    """Wraps what the model factory returned.

    Raises:
      TypeError: for anything that is not a linen Module, an nnx Module or a callable.
    """
    from flax import linen as nn  # noqa: PLC0415

    if isinstance(model, nn.Module):
        return ModelAdapter(kind="linen", apply_fn=model.apply, module=model)
    # An nnx module's class imported flax.nnx already; importing it for a linen model or a
    # function would add a quarter of a second to every cold start.
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        return ModelAdapter(kind="nnx", apply_fn=_nnx_apply(model), module=model)
    if callable(model):
        return ModelAdapter(kind="function", apply_fn=model)
    raise TypeError(
        f"model factory returned a {type(model).__name__}; return a flax.linen Module, a flax.nnx "
        "Module or an apply_fn(variables, *inputs)"
    )


def _nnx_apply(model: Any) -> Callable[..., Any]:
    from flax import nnx  # noqa: PLC0415

    graphdef, params_template, rest_template = nnx.split(model, nnx.Param, ...)

    params_paths = nnx.to_pure_dict(params_template)

    def apply(variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        # A saved `nnx.state(model)` holds every variable (batch statistics too), not just the
        # params: what is not a Param goes to the rest of the module's state.
        own, others_saved = _split_by_template(variables["params"], params_paths)
        params = jax.tree.map(lambda x: x, params_template)
        nnx.replace_by_pure_dict(params, own)
        rest = jax.tree.map(lambda x: x, rest_template)
        others = [collection for k, collection in variables.items() if k != "params"]
        for collection in [others_saved, *others] if others_saved else others:
            nnx.replace_by_pure_dict(rest, collection)
        module = nnx.merge(graphdef, params, rest)
        module.eval()
        return module(*args, **kwargs)

    return apply


def _split_by_template(pure: Any, template: Any) -> tuple[Any, dict[str, Any]]:
    """(the part of `pure` whose paths are in `template`, the rest), both nested dicts."""
    if not isinstance(pure, Mapping) or not isinstance(template, Mapping):
        return pure, {}
    inside: dict[Any, Any] = {}
    outside: dict[Any, Any] = {}
    for key, value in pure.items():
        if key not in template:
            outside[key] = value
            continue
        own, rest = _split_by_template(value, template[key])
        if not isinstance(own, Mapping) or own:
            inside[key] = own
        if rest:
            outside[key] = rest
    return inside, outside


def nnx_params(model: Any) -> dict[str, Any]:
    """The pure-dict params of an nnx module (what to save in a checkpoint)."""
    from flax import nnx  # noqa: PLC0415

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
