"""Evaluation suites: several evaluations of each checkpoint, named, in one config.

    suites:
      val:  {eval_function: my_pkg.ev:eval_fn, data: my_pkg.data:val, batch_size: 64}
      test: {eval_function: my_pkg.ev:eval_fn, data: my_pkg.data:val, split: test, batch_size: 64}
      harness: {kind: lm_harness, tasks: [pydoc_cloze], policy: {every_n_steps: 1000}}

    specs = parse_suites(raw["suites"])      # (SuiteConfig("val", "eval", {...}), ...), strictly
    suite_hash(run_hash, specs[0])           # the suite's stream identity in the ledger

A suite is a `kind` (default ``eval``: today's evaluation), an optional `policy` (its cadence;
``watch.policy`` when left out) and that kind's options. The ``eval``
kind's options are checked here (`EvalSuiteOptions`); a plug-in kind's options are checked by the
kind's own ``Config.from_mapping`` when the suites are built (`tracker_eval.runners.suites`). A
config without ``suites`` is one suite named ``""`` whose keys and ledger stream are today's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from tracker_eval.errors import ConfigError

SUITE_NAME = re.compile(r"^[a-z0-9_]+$")
"""Valid suite names: they become tracker keys (``eval/<suite>/loss``) and ledger labels."""
EVAL_KIND = "eval"
# Options that change how fast, not which numbers: a new value keeps the suite's ledger stream.
_NOT_IN_IDENTITY = ("batch_size", "cache", "cache_max_mb")


@dataclasses.dataclass(frozen=True)
class EvalSuiteOptions:
    """Options of a ``kind: eval`` suite: the keys one evaluation has at the top level of a config
    without ``suites`` (same meaning, see `tracker_eval.config.schema.EvalConfig`)."""

    eval_function: str
    """Import path of (params, apply_fn, batch, rng) -> (dict[str, Metric], mutable)."""
    data: str
    """Import path of the data factory (*, split, batch_size, process_index, process_count, **data_kwargs)."""
    batch_size: int
    """Global batch size of this suite."""
    split: str = "validation"
    """Data split passed to the data factory."""
    finalize: str | None = None
    """Optional import path of (dict[str, float]) -> dict[str, float] adding derived metrics."""
    data_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword arguments for the data factory."""
    cache: str = "host"
    """host | device | none: keep this suite's prepared batches between checkpoints."""
    cache_max_mb: float = 1024.0
    """Largest eval set (this process's share, padded) the cache keeps."""


EVAL_SUITE_KEYS = tuple(f.name for f in dataclasses.fields(EvalSuiteOptions))
"""Keys that belong to a suite: at the top level only in a config without ``suites``."""
_REQUIRED = tuple(f.name for f in dataclasses.fields(EvalSuiteOptions) if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING)


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """One named suite of a config."""

    name: str
    """The suite's name, ``[a-z0-9_]+``; ``""`` for the one evaluation of a config without ``suites``."""
    kind: str = EVAL_KIND
    """eval (built in) or a plug-in kind from the entry-point group ``tracker_eval.suites`` (e.g. lm_harness)."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The kind's options; for ``eval`` every `EvalSuiteOptions` field, defaults filled in."""
    policy: Any = None
    """all | latest | {every_n_steps: N}: which checkpoints this suite evaluates; null = ``watch.policy``.
    Not part of the suite's identity: a new cadence keeps its ledger stream and applies from then on."""


def parse_suites(raw: Any, *, build: Any) -> tuple[SuiteConfig, ...]:
    """Checks the ``suites:`` mapping and returns its suites in config order.

    Args:
      raw: the ``suites`` value as loaded from YAML.
      build: the loader's strict dataclass builder, ``build(cls, mapping, prefix=...)``.

    Raises:
      ConfigError: not a mapping, empty, a bad name, a spec that is not a mapping, a ``kind`` that
        is not a string, or an ``eval`` suite with an unknown, missing or mistyped option.
    """
    if isinstance(raw, (list, tuple)):
        raise ConfigError("suites must be a mapping of name -> suite (e.g. suites: {val: {data: ...}}), got a list")
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"suites must be a non-empty mapping of name -> suite, got {raw!r}")
    parsed = []
    for name, spec in raw.items():
        if not isinstance(name, str) or not SUITE_NAME.match(name):
            raise ConfigError(f"suite name {name!r} is not valid; use lowercase letters, digits and _ ([a-z0-9_]+)")
        where = f"suites.{name}"
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping of options (e.g. {{data: pkg.mod:make, ...}}), got {spec!r}")
        options = dict(spec)
        kind = options.pop("kind", EVAL_KIND)
        policy = options.pop("policy", None)  # checked with watch.policy by `validate`
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{where}.kind must be a suite kind name (eval, lm_harness, ...), got {kind!r}")
        if kind == EVAL_KIND:
            unknown = sorted(set(options) - set(EVAL_SUITE_KEYS))
            if unknown:
                raise ConfigError(f"unknown option {where}.{unknown[0]}; options of kind eval: kind, policy, "
                                  f"{', '.join(EVAL_SUITE_KEYS)}")
            for key in _REQUIRED:
                if options.get(key) is None:
                    raise ConfigError(f"{where}.{key} is required; set it under {where}")
            built = build(EvalSuiteOptions, options, prefix=f"{where}.")
            options = dataclasses.asdict(built)
            options["data_kwargs"] = dict(built.data_kwargs)
        parsed.append(SuiteConfig(name=name, kind=kind, options=options, policy=policy))
    return tuple(parsed)


def stable_hash(value: Any) -> str:
    """A short hash of a JSON-able value, independent of key order."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def suite_hash(run_hash: str, suite: SuiteConfig) -> str:
    """The ledger stream identity of one suite of a run: the run's shared fields (`run_hash`), the
    suite's name and kind, and every option that changes its numbers (not batch size or cache)."""
    identity = {k: v for k, v in suite.options.items() if k not in _NOT_IN_IDENTITY}
    return stable_hash({"run": run_hash, "suite": suite.name, "kind": suite.kind, "options": identity})
