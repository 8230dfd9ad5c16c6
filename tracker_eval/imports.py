"""Resolves user code named by import path (`pkg.module:attr`) when the config loads, and lazy exports.

    make_model = resolve("my_pkg.models:make_model", key="model")
    __getattr__ = lazy_exports(__name__, {"Ledger": "steps"})   # in a package's __init__.py
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from tracker_eval.errors import ConfigError


def resolve(path: str, *, key: str) -> Any:
    """Imports `pkg.module:attr` (attr may be dotted) and returns the object.

    Args:
      path: the import path.
      key: the config key that named it, for the error message.

    Raises:
      ConfigError: naming the key, the path and what went wrong.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}={path!r} is not an import path; write it as pkg.module:attr")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"{key}={path!r}: module {e.name!r} not found; check the spelling or install the package"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{key}={path!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"{key}={path!r} names a {type(obj).__name__}, not a callable")
    return obj


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` that imports each public name from its submodule on first use.

    Keeps `import tracker_eval.<stage>` light: JAX, Orbax and friends load only when a name that
    needs them is used.

    Args:
      package: the package's `__name__`.
      names: public name -> submodule (relative to `package`) that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
