"""Resolves `loggers:` config entries to logger instances through the `tracker_eval.loggers` entry points.

Built-ins (console, jsonl) and plug-ins (wandb, mlflow, third-party) are all registered in that one
group, so adding a tracker needs no change here. Each logger class declares its options as a frozen
dataclass in ``Config`` and is constructed as ``cls(config, context=..., name=...)``.

    context = LoggerContext(output_dir="runs/demo", run_key="ckpts@1a2b")
    loggers = build_loggers([{"type": "console"}, {"type": "jsonl", "path": "m.jsonl"}], context)
    available_logger_types()  # ['console', 'jsonl', 'mlflow', 'tensorboard', 'wandb']
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from tracker_eval.errors import ConfigError
from tracker_eval.loggers.base import Logger, LoggerContext

ENTRY_POINT_GROUP = "tracker_eval.loggers"
# `id` names the logger instance (ledger outbox, warnings); `name` stays free for trackers'
# own options such as the W&B run name.
_RESERVED_KEYS = ("type", "id")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclasses.dataclass(frozen=True)
class LoggerSpec:
    """One validated `loggers:` entry.

    Attributes:
      type_name: the entry-point name (``wandb``) or an import path (``pkg.module:Class``).
      name: unique instance name; defaults to the type.
      cls: the logger class.
      config: an instance of ``cls.Config`` holding the options.
    """

    type_name: str
    name: str
    cls: type
    config: Any


def available_logger_types() -> list[str]:
    """Returns the sorted names registered in the ``tracker_eval.loggers`` entry-point group."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def load_logger_class(type_name: str) -> type:
    """Returns the logger class for an entry-point name or a ``pkg.module:Class`` import path.

    Args:
      type_name: ``console``, ``jsonl``, ``wandb``, ``mlflow``, any installed plug-in name, or an
        import path ``pkg.module:Class`` of a logger that is not registered.

    Raises:
      ConfigError: the type is not installed or cannot be imported; the message lists installed types.
    """
    installed = available_logger_types()
    if ":" in type_name:
        module_name, _, attr = type_name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(
                f"logger type {type_name!r} could not be imported ({e}); installed types: "
                f"{', '.join(installed)}; or give an import path pkg.module:Class"
            ) from None
    matches = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name]
    if not matches:
        raise ConfigError(
            f"unknown logger type {type_name!r}; installed types: {', '.join(installed) or '(none)'}. "
            "Fix the spelling, install the plug-in package that registers it, or give an import path "
            "pkg.module:Class"
        )
    try:
        return matches[0].load()
    except ImportError as e:
        raise ConfigError(
            f"logger type {type_name!r} is registered by {matches[0].value} but failed to import: {e}"
        ) from None


def parse_logger_specs(specs: Sequence[Mapping[str, Any]]) -> list[LoggerSpec]:
    """Validates every `loggers:` entry without constructing any logger.

    Args:
      specs: mappings ``{type: NAME, id?: str, **options}``.

    Returns:
      One `LoggerSpec` per entry, in order.

    Raises:
      ConfigError: a missing or unknown type, an unknown or ill-typed option, or a duplicate name.
    """
    parsed: list[LoggerSpec] = []
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        where = f"loggers[{index}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping like {{type: console}}, got {spec!r}")
        type_name = spec.get("type")
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(
                f"{where} needs a 'type'; installed types: {', '.join(available_logger_types())}"
            )
        cls = load_logger_class(type_name)
        name = spec.get("id", type_name.rpartition(":")[2].lower() if ":" in type_name else type_name)
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ConfigError(f"{where}.id must be letters, digits, '_', '-' or '.', got {name!r}")
        if name in seen:
            raise ConfigError(
                f"{where}: logger name {name!r} is already used by loggers[{seen[name]}]; "
                f"add a distinct 'id:' to one of them (e.g. id: {name}-2)"
            )
        seen[name] = index
        options = {k: v for k, v in spec.items() if k not in _RESERVED_KEYS}
        config = make_config(cls, options, where=f"{where} (type {type_name})")
        parsed.append(LoggerSpec(type_name=type_name, name=name, cls=cls, config=config))
    return parsed


def build_loggers(specs: Sequence[Mapping[str, Any]], context: LoggerContext) -> list[Logger]:
    """Validates all specs, then constructs the loggers in order.

    Args:
      specs: the `loggers:` entries of the config.
      context: output directory, metric prefix, run key and remembered tracker state.

    Returns:
      The loggers, each with a unique ``name``.

    Raises:
      ConfigError: invalid specs (nothing is constructed then).
      Exception: whatever a logger's constructor raised; loggers built before it are closed first.
    """
    built: list[Logger] = []
    try:
        for spec in parse_logger_specs(specs):
            built.append(spec.cls(spec.config, context=context, name=spec.name))
    except BaseException:
        for logger in built:
            try:
                logger.close()
            except Exception:  # the constructor error is the one to report
                pass
        raise
    return built


def make_config(cls: type, options: Mapping[str, Any], *, where: str = "logger") -> Any:
    """Builds ``cls.Config`` from options, checking keys and simple types.

    Args:
      cls: a logger class with a frozen-dataclass ``Config`` attribute.
      options: the spec's options (without ``type`` and ``name``).
      where: location used in error messages.

    Raises:
      ConfigError: an unknown key (valid keys listed) or a value of the wrong type.
    """
    config_cls = getattr(cls, "Config", None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        if options:
            raise ConfigError(f"{where} takes no options, got {sorted(options)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key in options:
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown option {key!r}; valid options: {', '.join(['id', *fields])}"
            )
    hints = typing.get_type_hints(config_cls)
    values = {
        key: _coerce(value, hints.get(key, Any), where=f"{where}: option {key!r}") for key, value in options.items()
    }
    return config_cls(**values)


def _coerce(value: Any, hint: Any, *, where: str) -> Any:
    """Checks a YAML value against a field type; lists become tuples for tuple fields."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm, where=where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} has the wrong type: got {value!r}, expected {_hint_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            inner = args[0] if args else Any
            return tuple(_coerce(v, inner, where=where) for v in value)
    elif origin in (Mapping, dict) or hint in (dict, Mapping):
        if isinstance(value, Mapping):
            return dict(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    else:
        return value
    raise ConfigError(f"{where} has the wrong type: got {value!r}, expected {_hint_name(hint)}")


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
