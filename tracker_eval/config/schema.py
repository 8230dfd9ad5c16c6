"""The typed, frozen configuration of one evaluation stream: every field documented where declared.

    config = EvalConfig(checkpoint_dir="/ckpt", model="pkg.m:make", eval_function="pkg.e:fn",
                        data="pkg.d:make", batch_size=64)
    config.for_suite("val")  # one suite's view of the config
    config.to_dict()       # as trackers record it, secrets masked

`tracker_eval.config.load` builds these from YAML, strictly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tracker_eval.config.ledger import LedgerConfig
from tracker_eval.config.policy import policy_name
from tracker_eval.config.suites import EVAL_KIND, SuiteConfig

CACHE_MODES = ("host", "device", "none")
_SUITE_ONLY = ("split", "finalize", "data_kwargs", "cache", "cache_max_mb")
"""Values of `EvalConfig.cache`."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where, inside an Orbax checkpoint, the evaluation finds what it needs."""

    item: str | None = None
    """Item of a composite checkpoint holding the train state; null = the only pytree item there is."""
    params: str | None = "params"
    """Path (dots or slashes) inside that item to the params subtree; null = the item's root (an
    item that is the params tree itself, as xlstm-jax's `params` item or `nnx.state(model)`)."""
    mutable: tuple[str, ...] = ()
    """Other collections to restore next to params, e.g. [batch_stats]."""
    step_prefix: str | None = None
    """Step folders are <step_prefix>_<N> (Orbax's CheckpointManagerOptions.step_prefix, e.g.
    checkpoint for xlstm-jax); '' = plain <N>; null = detected from the folder names."""
    step_format_fixed_length: int | None = None
    """<N> is zero-padded to this many digits (Orbax's step_format_fixed_length); null = none, or
    detected with the prefix when step_prefix is null too."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 takes all remaining devices (at most one axis may say -1).

    Either the three axes data/fsdp/tensor, or `axes` with the model's own names (those its
    collectives use, e.g. xlstm-jax's dp/fsdp/pp/tp) and `batch_axes` naming which split the batch.
    """

    data: int = -1
    """Data-parallel axis: the global batch is split over data x fsdp."""
    fsdp: int = 1
    """Fully-sharded axis: batch is split over it and params may be sharded over it."""
    tensor: int = 1
    """Tensor-parallel axis for eval functions that shard activations on non-batch axes."""
    axes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """{name: size} in mesh order, replacing data/fsdp/tensor, e.g. {dp: -1, fsdp: 2, tp: 2}; {} = unused."""
    batch_axes: tuple[str, ...] = ()
    """With `axes`: the axes that split the batch, e.g. [dp, fsdp]; params_sharding fsdp uses an axis named fsdp."""


@dataclasses.dataclass(frozen=True)
class BestConfig:
    """Which metric makes a checkpoint the best so far."""

    metric: str = "loss"
    """Scalar metric name as returned by the eval function (no prefix)."""
    mode: str = "min"
    """min or max."""
    suite: str | None = None
    """The suite whose metric it is; may be omitted in a config with one suite (or none)."""


@dataclasses.dataclass(frozen=True)
class AlertConfig:
    """A regression alert: a new checkpoint significantly worse than a reference step (paired test)."""

    metric: str
    """Metric with per-example values (e.g. loss, accuracy, or a harness task's `<task>/acc`)."""
    mode: str = "min"
    """min (lower is better) or max."""
    suite: str | None = None
    """The suite whose metric it is; may be omitted in a config with one suite (or none)."""
    against: str = "best"
    """best (the best earlier step by this metric) or previous (the newest earlier evaluated step)."""
    p: float = 0.01
    """Alert only when the paired test's two-sided p is below this."""
    min_delta: float = 0.0
    """...and the mean is worse by more than this (in the metric's units)."""


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """Settings of `tracker-eval watch`."""

    poll_interval_s: float = 5.0
    """Seconds between directory listings (the fast path reacts sooner on local disks)."""
    policy: Any = "all"
    """all | latest | {every_n_steps: N}: which checkpoints to evaluate (a suite's own `policy` overrides it)."""
    order: str = "oldest_first"
    """oldest_first | newest_first: which due step goes first. newest_first takes the newest step,
    then the backlog from newer to older; a step found meanwhile goes ahead of the rest of the backlog."""
    until_step: int | None = None
    """Stop once this step is evaluated and delivered (or parked in the outbox after `outbox_wait_s`)."""
    idle_timeout_s: float | None = None
    """Stop after this many seconds without a new checkpoint; null = never."""
    max_attempts: int = 3
    """Evaluation attempts of a failing (e.g. corrupt) checkpoint before it is given up."""
    max_delivery_attempts: int = 5
    """Failed deliveries of one result to one tracker (outages do not count) before that delivery is
    marked undeliverable and later steps go on; a refusal (e.g. HTTP 400) marks it at once."""
    best: BestConfig | None = None
    """Track the best checkpoint by this metric; null = off."""
    alerts: tuple[AlertConfig, ...] = ()
    """Regression alerts, each raised once per (step, rule) and delivered once to every tracker."""
    fast_path: bool = True
    """React to local filesystem events (inotify) in addition to polling."""
    lease_ttl_s: float = 30.0
    """A dead watcher's claim on a checkpoint blocks others for at most this long."""
    delivery_deadline_s: float = 60.0
    """Longest a single logger call may take before it counts as failed and is retried later."""
    outbox_wait_s: float = 60.0
    """When stopping on until_step or idle_timeout_s: how long results that trackers have not taken
    yet are waited for before they are left in the outbox for the next run."""
    health_stale_s: float | None = None
    """`status --health` reports unhealthy once the watcher's heartbeat is older than this; null =
    max(120 s, 3 * poll_interval_s). The heartbeat is renewed at each poll and, during an evaluation,
    at each claim renewal (lease_ttl_s / 3): a smaller value makes a busy watcher look dead."""


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
    eval_function: str | None = None
    """Import path of (params, apply_fn, batch, rng) -> (dict[str, Metric], mutable); xlstm-jax's
    {"value", "count"} metrics and scalars are accepted too. Required without `suites`; with
    `suites` it is a suite option."""
    data: str | None = None
    """Import path of (*, split, batch_size, process_index, process_count, **data_kwargs) -> iterable
    of batches. Required without `suites`; with `suites` it is a suite option."""
    batch_size: int | None = None
    """Global batch size; with N processes each yields its 1/N slice of every global batch. Required
    without `suites`; with `suites` it is a suite option."""
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
    cache: str = "host"
    """host | device | none: keep the prepared eval batches between checkpoints in host memory, on the
    devices (already sharded), or not at all; host and device hold only while the set fits in cache_max_mb."""
    cache_max_mb: float = 1024.0
    """Largest eval set (this process's share, padded) the cache keeps; a larger one is read again per checkpoint."""
    seed: int = 0
    """Seed of the eval rng (folded with the batch index, so every batch gets its own key)."""
    output_dir: str = "runs/eval"
    """Where tracker-eval writes its own files (ledger, JSONL, results)."""
    ledger: LedgerConfig = LedgerConfig()
    """Where the ledger lives: the SQLite file in output_dir by default, or a PostgreSQL database
    (`tracker_eval.config.ledger`) that watchers on several machines share."""
    loggers: tuple[Mapping[str, Any], ...] = ({"type": "console"},)
    """Logger specs {type: NAME, ...options}; see README's logger reference."""
    metric_prefix: str = "eval"
    """Metric keys in trackers are <metric_prefix>/<name>."""
    watch: WatchConfig = WatchConfig()
    """Watcher settings."""
    distributed: DistributedConfig | None = None
    """JAX distributed runtime settings; null = single process."""
    suites: tuple[SuiteConfig, ...] = ()
    """Named suites evaluated on every checkpoint after one restore (see `tracker_eval.config.suites`);
    empty = the evaluation the top-level keys describe, as one suite named ""."""

    @property
    def has_suites(self) -> bool:
        """Whether the config names its suites (`suites:`), rather than one top-level evaluation."""
        return bool(self.suites)

    def suite_list(self) -> tuple[SuiteConfig, ...]:
        """The suites in config order; without `suites`, one eval suite named "" (today's evaluation)."""
        if self.suites:
            return self.suites
        return (SuiteConfig(name="", kind=EVAL_KIND, options={}),)

    def suite(self, name: str) -> SuiteConfig:
        """The suite called `name`.

        Raises:
          KeyError: no such suite.
        """
        for suite in self.suite_list():
            if suite.name == name:
                return suite
        raise KeyError(name)

    def for_suite(self, name: str) -> EvalConfig:
        """This config as one `kind: eval` suite sees it: the suite's options in the top-level eval
        keys, no `suites` (the config itself for the suite "")."""
        if not self.suites:
            return self
        suite = self.suite(name)
        if suite.kind != EVAL_KIND:
            return dataclasses.replace(self, suites=())
        return dataclasses.replace(self, suites=(), **dict(suite.options))

    def suite_policy(self, name: str) -> tuple[str, int]:
        """Suite `name`'s cadence as (policy name, every_n): its own `policy`, else `watch.policy`."""
        own = self.suite(name).policy
        if own is None:
            return policy_name(self.watch.policy)
        return policy_name(own, key=f"suites.{name}.policy")

    def best_suite(self) -> str | None:
        """The suite whose metric `watch.best` tracks, or None when best tracking is off."""
        if self.watch.best is None:
            return None
        if self.watch.best.suite is not None:
            return self.watch.best.suite
        return self.suite_list()[0].name

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the config as trackers record it (run config), secrets masked."""
        from tracker_eval.redact import redact  # noqa: PLC0415

        plain = _plain(dataclasses.asdict(self))
        # Keys a config without suites never had stay out, so its trackers' run config is unchanged.
        suites = plain.pop("suites")
        if self.suites:
            plain["suites"] = {s["name"]: {"kind": s["kind"], **({"policy": s["policy"]} if s["policy"] else {}),
                                           **s["options"]} for s in suites}
            for key in ("eval_function", "data", "batch_size", *_SUITE_ONLY):
                plain.pop(key, None)
        if self.ledger == LedgerConfig():  # the default: run configs recorded before stay as they were
            del plain["ledger"]
        if plain["watch"]["best"] is not None and plain["watch"]["best"]["suite"] is None:
            del plain["watch"]["best"]["suite"]
        return redact(plain)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
