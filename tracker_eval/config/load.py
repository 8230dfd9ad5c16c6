"""Loads a config from YAML with `key=value` overrides, strictly, into `tracker_eval.config.schema`.

Unknown keys, wrong types and missing required keys are `ConfigError`s naming the key and the valid
choices, so a typo fails before any work starts.

    config = load_config("configs/watch.yaml", overrides=["batch_size=128", "mesh.data=4"])
    config.mesh.data  # 4
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from tracker_eval.config.ledger import check_ledger_url
from tracker_eval.config.policy import policy_name
from tracker_eval.config.ranges import RANGES, check_ranges
from tracker_eval.config.schema import CACHE_MODES, CheckpointConfig, EvalConfig, MeshConfig
from tracker_eval.config.suites import EVAL_KIND, EVAL_SUITE_KEYS, parse_suites
from tracker_eval.errors import ConfigError, one_line
from tracker_eval.redact import remember_secrets

REQUIRED_KEYS = ("checkpoint_dir", "model", "eval_function", "data", "batch_size")


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> EvalConfig:
    """Loads and validates a config.

    Args:
      path: YAML file; None starts from `base` (or nothing).
      overrides: `key=value` strings; nested keys with dots (`mesh.data=4`), values parsed as YAML.
      base: mapping applied before the file (e.g. embedded demo defaults).

    Returns:
      The validated, frozen config. `${oc.env:VAR}` / `${oc.env:VAR,default}` interpolations are
      resolved from the environment (how secrets enter without being written to files).

    Raises:
      ConfigError: unreadable file, bad YAML, unknown key, wrong type or missing required key.
    """
    from omegaconf import OmegaConf  # noqa: PLC0415 - keeps `import tracker_eval` light
    from omegaconf.errors import OmegaConfBaseException  # noqa: PLC0415

    try:
        merged = OmegaConf.create(dict(base or {}))
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {str(path)!r} does not exist; pass --config PATH of a YAML file")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value; write e.g. batch_size=64 or mesh.data=4")
            key, _, _ = item.partition("=")
            if not key or key != key.strip():
                raise ConfigError(f"override {item!r} has no valid key; write e.g. batch_size=64")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(merged, resolve=True)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(f"config could not be read: {one_line(e)}") from None
    except Exception as e:  # yaml errors and the like
        duplicate = _DUPLICATE.search(str(e))
        if duplicate:  # YAML itself would keep the last of two equal keys; a second suite "val" is a mistake
            raise ConfigError(
                f"config {str(path)!r}: key {duplicate.group(1)!r} appears twice in one mapping (line "
                f"{duplicate.group(2)}); each key, and each suite name under suites, may appear once"
            ) from None
        raise ConfigError(f"config {str(path)!r} could not be parsed: {one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping of keys, got {type(raw).__name__}")
    remember_secrets(raw)  # e.g. the password of a tracking_uri: masked wherever an error text quotes it
    suites = raw.pop("suites", None)
    if suites is not None:
        misplaced = [k for k in EVAL_SUITE_KEYS if k in raw]
        if misplaced:
            raise ConfigError(
                f"{misplaced[0]} is a suite option when suites are set; move it under each suite "
                f"(suites.<name>.{misplaced[0]}) or remove suites"
            )
        missing = [k for k in REQUIRED_KEYS if k not in EVAL_SUITE_KEYS and raw.get(k) is None]
    else:
        missing = [k for k in REQUIRED_KEYS if raw.get(k) is None]
    if missing:
        raise ConfigError(
            f"missing required config key(s) {missing}; set them in the YAML file or as key=value overrides"
        )
    config = _build(EvalConfig, raw, prefix="")
    if suites is not None:
        config = dataclasses.replace(config, suites=parse_suites(suites, build=_build))
    validate(config)
    return config


_DUPLICATE = re.compile(r"found duplicate key (\S+)\s+in \"[^\"]*\", line (\d+)")


PARAMS_SHARDINGS = ("auto", "replicated", "fsdp")
POLICIES = ("all", "latest", "every_n_steps")
ORDERS = ("oldest_first", "newest_first")


def validate(config: EvalConfig) -> None:
    """Checks values that types alone cannot (ranges, see `tracker_eval.config.ranges`; choices).

    Raises:
      ConfigError: naming the key, the bad value and the valid choices.
    """
    check_ranges(config, skip=("batch_size",) if config.suites else ())
    _validate_mesh(config.mesh)
    _validate_checkpoint(config.checkpoint)
    if config.params_sharding not in PARAMS_SHARDINGS:
        raise ConfigError(
            f"params_sharding {config.params_sharding!r} is not one of {', '.join(PARAMS_SHARDINGS)}"
        )
    if config.cache not in CACHE_MODES:
        raise ConfigError(f"cache {config.cache!r} is not one of {', '.join(CACHE_MODES)}")
    _validate_suites(config)
    if config.ledger.url is not None:
        check_ledger_url(config.ledger.url, where="ledger.url")
    policy_name(config.watch.policy)
    if config.watch.order not in ORDERS:
        raise ConfigError(f"watch.order {config.watch.order!r} is not one of {', '.join(ORDERS)}")
    best = config.watch.best
    if best is not None and best.mode not in ("min", "max"):
        raise ConfigError(f"watch.best.mode {best.mode!r} is not one of min, max")
    if best is not None:
        names = [s.name for s in config.suites]
        if best.suite is None and len(names) > 1:
            raise ConfigError(f"watch.best.suite is required with several suites; set it to one of {', '.join(names)}")
        if best.suite is not None and best.suite not in names:
            valid = f"one of {', '.join(names)}" if names else "left out in a config without suites"
            raise ConfigError(f"watch.best.suite {best.suite!r} is not a suite of this config; it must be {valid}")
    _validate_alerts(config)
    for i, spec in enumerate(config.loggers):
        if not isinstance(spec.get("type"), str):
            raise ConfigError(f"loggers[{i}] needs a 'type' (e.g. console, jsonl, wandb, mlflow), got {dict(spec)!r}")


def _validate_mesh(mesh: MeshConfig) -> None:
    named = dict(mesh.axes)
    if named and (mesh.data, mesh.fsdp, mesh.tensor) != (-1, 1, 1):
        raise ConfigError("mesh.axes replaces mesh.data/fsdp/tensor; give the sizes in mesh.axes only")
    if named and not mesh.batch_axes:
        raise ConfigError(f"mesh.axes {named} needs mesh.batch_axes: the axes that split the batch, e.g. "
                          f"[{', '.join(list(named)[:2])}]")
    unknown = [a for a in mesh.batch_axes if a not in named]
    if mesh.batch_axes and unknown:
        raise ConfigError(f"mesh.batch_axes names {unknown[0]!r}, which is not in mesh.axes; "
                          f"use some of {', '.join(named) or 'mesh.axes (set it first)'}")
    sizes = named or {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    for axis, size in sizes.items():
        where = f"mesh.axes.{axis}" if named else f"mesh.{axis}"
        if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1:
            raise ConfigError(f"{where} must be a positive size or -1 (all remaining devices), got {size!r}")
    if sum(1 for s in sizes.values() if s == -1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got mesh={sizes}")


def _validate_checkpoint(checkpoint: CheckpointConfig) -> None:
    prefix = checkpoint.step_prefix
    if prefix and ("/" in prefix or prefix.strip() != prefix):
        raise ConfigError(f"checkpoint.step_prefix {prefix!r} must be a folder-name prefix without '/' or spaces "
                          "at its ends, as in CheckpointManagerOptions(step_prefix=...), e.g. checkpoint")
    length = checkpoint.step_format_fixed_length
    if length is not None and length < 1:
        raise ConfigError(f"checkpoint.step_format_fixed_length must be >= 1 (digits of the zero-padded step), "
                          f"got {length}; or null for none")


def _validate_alerts(config: EvalConfig) -> None:
    names = [s.name for s in config.suites]
    for i, rule in enumerate(config.watch.alerts):
        where = f"watch.alerts[{i}]"
        if rule.mode not in ("min", "max"):
            raise ConfigError(f"{where}.mode {rule.mode!r} is not one of min, max")
        if rule.against not in ("best", "previous"):
            raise ConfigError(f"{where}.against {rule.against!r} is not one of best, previous")
        if not 0.0 < rule.p < 1.0:
            raise ConfigError(f"{where}.p {rule.p!r} must be between 0 and 1 (e.g. 0.01)")
        if rule.min_delta < 0:
            raise ConfigError(f"{where}.min_delta {rule.min_delta!r} must be >= 0")
        if rule.suite is None and len(names) > 1:
            raise ConfigError(f"{where}.suite is required with several suites; set it to one of {', '.join(names)}")
        if rule.suite is not None and rule.suite not in names:
            valid = f"one of {', '.join(names)}" if names else "left out in a config without suites"
            raise ConfigError(f"{where}.suite {rule.suite!r} is not a suite of this config; it must be {valid}")


def _validate_suites(config: EvalConfig) -> None:
    """Each suite's `policy`, and values of each `kind: eval` suite's options that types alone cannot check."""
    for suite in config.suites:
        if suite.policy is not None:
            policy_name(suite.policy, key=f"suites.{suite.name}.policy")
        if suite.kind != EVAL_KIND:
            continue
        where = f"suites.{suite.name}"
        if suite.options["cache"] not in CACHE_MODES:
            raise ConfigError(f"{where}.cache {suite.options['cache']!r} is not one of {', '.join(CACHE_MODES)}")
        for key in ("batch_size", "cache_max_mb"):
            valid, value = RANGES[key], suite.options[key]
            if not valid.contains(value):
                raise ConfigError(f"{where}.{key} must be in {valid.text()}, got {value!r}; set it within that range")


def _build(cls: type, raw: Any, *, prefix: str) -> Any:
    """Builds dataclass `cls` from a plain mapping, strictly."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f" in {prefix.rstrip('.')!r}" if prefix else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}{where}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, key=prefix + name) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, *, key: str) -> Any:
    """Checks `value` against a type hint and converts lists/mappings to their frozen forms."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key=key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, key=f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Mapping or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"config key {key!r} must be null, got {value!r}")
        return None
    raise TypeError(f"unsupported config type {hint!r} for {key}")
