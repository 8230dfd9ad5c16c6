"""Typed, frozen run configuration loaded from YAML with `key=value` overrides.

Every field is documented where it is declared. Unknown keys, wrong types and missing required keys
are `ConfigError`s naming the key and the valid choices, so a typo fails before any work starts.

    config = load_config("configs/demo.yaml", overrides=["batch_size=128", "mesh.data=4"])
    config.mesh.data  # 4
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from tracker_eval.errors import ConfigError, one_line


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where, inside an Orbax checkpoint, the evaluation finds what it needs."""

    item: str | None = None
    """Item of a composite checkpoint holding the train state; null = the only item there is."""
    params: str = "params"
    """Path (dots or slashes) inside that item to the params subtree."""
    mutable: tuple[str, ...] = ()
    """Other collections to restore next to params, e.g. [batch_stats]."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 takes all remaining devices (at most one axis may say -1)."""

    data: int = -1
    """Data-parallel axis: the global batch is split over data x fsdp."""
    fsdp: int = 1
    """Fully-sharded axis: batch is split over it and params may be sharded over it."""
    tensor: int = 1
    """Tensor-parallel axis for eval functions that shard activations on non-batch axes."""


@dataclasses.dataclass(frozen=True)
class BestConfig:
    """Which metric makes a checkpoint the best so far."""

    metric: str = "loss"
    """Scalar metric name as returned by the eval function (no prefix)."""
    mode: str = "min"
    """min or max."""


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """Settings of `tracker-eval watch`."""

    poll_interval_s: float = 5.0
    """Seconds between directory listings (the fast path reacts sooner on local disks)."""
    policy: Any = "all"
    """all | latest | {every_n_steps: N}: which checkpoints to evaluate."""
    until_step: int | None = None
    """Stop once this step is evaluated and delivered (or parked in the outbox after `outbox_wait_s`)."""
    idle_timeout_s: float | None = None
    """Stop after this many seconds without a new checkpoint; null = never."""
    max_attempts: int = 3
    """Evaluation attempts of a failing (e.g. corrupt) checkpoint before it is given up."""
    best: BestConfig | None = None
    """Track the best checkpoint by this metric; null = off."""
    fast_path: bool = True
    """React to local filesystem events (inotify) in addition to polling."""
    lease_ttl_s: float = 30.0
    """A dead watcher's claim on a checkpoint blocks others for at most this long."""
    delivery_deadline_s: float = 60.0
    """Longest a single logger call may take before it counts as failed and is retried later."""
    outbox_wait_s: float = 60.0
    """When stopping on until_step or idle_timeout_s: how long results that trackers have not taken
    yet are waited for before they are left in the outbox for the next run."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """JAX distributed runtime; omit the block for a single-process run."""

    auto: bool = False
    """Let JAX detect the cluster (SLURM, Kubernetes/JobSet, TPU) instead of the fields below."""
    coordinator_address: str | None = None
    """host:port of process 0's coordinator."""
    num_processes: int | None = None
    """Number of processes in the job."""
    process_id: int | None = None
    """This process's index, 0..num_processes-1."""
    heartbeat_timeout_s: float = 60.0
    """A peer silent this long is declared lost and the job stops."""
    initialization_timeout_s: float = 120.0
    """How long to wait for all peers to join."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation stream: which checkpoints, which model/eval/data, where results go."""

    checkpoint_dir: str
    """An Orbax CheckpointManager root: <dir>/<step>/..."""
    model: str
    """Import path pkg.module:attr of a zero-arg factory -> flax.linen Module, flax.nnx Module or apply_fn."""
    eval_function: str
    """Import path of (params, apply_fn, batch, rng) -> (dict[str, Metric], mutable)."""
    data: str
    """Import path of (*, split, batch_size, process_index, process_count, **data_kwargs) -> iterable of batches."""
    batch_size: int
    """Global batch size; with N processes each yields its 1/N slice of every global batch."""
    split: str = "validation"
    """Data split passed to the data factory."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """What to restore from each checkpoint."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh for evaluation."""
    params_sharding: str = "auto"
    """auto (fsdp when mesh.fsdp > 1, else replicated) | replicated | fsdp."""
    finalize: str | None = None
    """Optional import path of (dict[str, float]) -> dict[str, float] adding derived metrics."""
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments for the model factory."""
    data_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword arguments for the data factory."""
    seed: int = 0
    """Seed of the eval rng (folded with the batch index, so every batch gets its own key)."""
    output_dir: str = "runs/eval"
    """Where tracker-eval writes its own files (ledger, JSONL, results)."""
    loggers: tuple[Mapping[str, Any], ...] = ({"type": "console"},)
    """Logger specs {type: NAME, ...options}; see README's logger reference."""
    metric_prefix: str = "eval"
    """Metric keys in trackers are <metric_prefix>/<name>."""
    watch: WatchConfig = WatchConfig()
    """Watcher settings."""
    distributed: DistributedConfig | None = None
    """JAX distributed runtime settings; null = single process."""

    def config_hash(self) -> str:
        """Hash of the fields that change the numbers (not mesh, batch size, loggers or paths).

        Exact evaluation gives the same metrics on any mesh and batch size, so a job rescheduled
        onto another cluster shape keeps its ledger; changing the model, eval function, data or
        restore paths starts a new stream.
        """
        keyed = {
            "model": self.model,
            "eval_function": self.eval_function,
            "data": self.data,
            "split": self.split,
            "checkpoint": dataclasses.asdict(self.checkpoint),
            "finalize": self.finalize,
            "model_kwargs": dict(self.model_kwargs),
            "data_kwargs": dict(self.data_kwargs),
            "seed": self.seed,
        }
        blob = json.dumps(keyed, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the config as trackers record it (run config), secrets masked."""
        from tracker_eval.redact import redact  # noqa: PLC0415

        return redact(_plain(dataclasses.asdict(self)))


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
        raise ConfigError(f"config {str(path)!r} could not be parsed: {one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping of keys, got {type(raw).__name__}")
    missing = [k for k in REQUIRED_KEYS if raw.get(k) is None]
    if missing:
        raise ConfigError(
            f"missing required config key(s) {missing}; set them in the YAML file or as key=value overrides"
        )
    config = _build(EvalConfig, raw, prefix="")
    validate(config)
    return config


PARAMS_SHARDINGS = ("auto", "replicated", "fsdp")
POLICIES = ("all", "latest", "every_n_steps")


def validate(config: EvalConfig) -> None:
    """Checks values that types alone cannot (ranges, choices).

    Raises:
      ConfigError: naming the key, the bad value and the valid choices.
    """
    if config.batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {config.batch_size}")
    sizes = dataclasses.asdict(config.mesh)
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis} must be a positive size or -1 (all remaining devices), got {size}")
    if sum(1 for s in sizes.values() if s == -1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got mesh={sizes}")
    if config.params_sharding not in PARAMS_SHARDINGS:
        raise ConfigError(
            f"params_sharding {config.params_sharding!r} is not one of {', '.join(PARAMS_SHARDINGS)}"
        )
    policy_name(config.watch.policy)
    if config.watch.best is not None and config.watch.best.mode not in ("min", "max"):
        raise ConfigError(f"watch.best.mode {config.watch.best.mode!r} is not one of min, max")
    if config.watch.max_attempts < 1:
        raise ConfigError(f"watch.max_attempts must be >= 1, got {config.watch.max_attempts}")
    if config.watch.poll_interval_s <= 0:
        raise ConfigError(f"watch.poll_interval_s must be > 0, got {config.watch.poll_interval_s}")
    if config.watch.outbox_wait_s < 0:
        raise ConfigError(f"watch.outbox_wait_s must be >= 0, got {config.watch.outbox_wait_s}")
    for i, spec in enumerate(config.loggers):
        if not isinstance(spec.get("type"), str):
            raise ConfigError(f"loggers[{i}] needs a 'type' (e.g. console, jsonl, wandb, mlflow), got {dict(spec)!r}")


def policy_name(policy: Any) -> tuple[str, int]:
    """Normalizes `watch.policy` to (name, every_n).

    Raises:
      ConfigError: for anything but all, latest or {every_n_steps: N} with N >= 1.
    """
    if policy in ("all", "latest"):
        return policy, 1
    if isinstance(policy, Mapping) and set(policy) == {"every_n_steps"}:
        n = policy["every_n_steps"]
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
            return "every_n_steps", n
    raise ConfigError(
        f"watch.policy {policy!r} is not valid; use all, latest or {{every_n_steps: N}} with N >= 1"
    )


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


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

