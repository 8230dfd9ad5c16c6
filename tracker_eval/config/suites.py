"""Evaluation suites: several evaluations of each checkpoint, named, in one config.

    suites:
      val:  {eval_function: my_pkg.ev:eval_fn, data: my_pkg.data:val, batch_size: 64}
      test: {eval_function: my_pkg.ev:eval_fn, data: my_pkg.data:val, split: test, batch_size: 64}
      harness: {kind: lm_harness, tasks: [pydoc_cloze], policy: {every_n_steps: 1000}}

    specs = parse_suites(raw["suites"])      # (SuiteConfig("val", "eval", {...}), ...), strictly
    load_kind("lm_harness", where="suites.harness")   # a plug-in kind's class, by entry point

A suite is a `kind` (default ``eval``: today's evaluation), an optional `policy` (its cadence;
``watch.policy`` when left out) and that kind's options. The ``eval``
kind's options are checked here (`EvalSuiteOptions`); a plug-in kind's options are checked by the
kind's own ``Config.from_mapping`` when the suites are built (`tracker_eval.runners.suites`). A
config without ``suites`` is one suite named ``""`` whose keys and ledger stream are today's. Which
options change a suite's identity is `tracker_eval.identity`'s to say.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from collections.abc import Mapping
from typing import Any

from tracker_eval.errors import ConfigError, one_line

SUITE_NAME = re.compile(r"^[a-z0-9_]+$")
"""Valid suite names: they become tracker keys (``eval/<suite>/loss``) and ledger labels."""
EVAL_KIND = "eval"
ENTRY_POINT_GROUP = "tracker_eval.suites"
"""Where plug-in suite kinds register (e.g. ``lm_harness``)."""


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


def load_kind(name: str, *, where: str) -> type:
    """The class registered for suite kind `name` in the entry-point group ``tracker_eval.suites``.

    Raises:
      ConfigError: no such kind is installed (lists the installed ones), or it does not import.
    """
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        installed = ", ".join([EVAL_KIND, *sorted(found)])
        raise ConfigError(f"{where}.kind {name!r} is not an installed suite kind; installed: {installed} "
                          f"(plug-in kinds register in the entry-point group {ENTRY_POINT_GROUP!r})")
    try:
        return found[name].load()
    except Exception as error:  # noqa: BLE001 - a broken plug-in is the user's to fix now
        raise ConfigError(f"{where}.kind {name!r} could not be loaded: {one_line(error, limit=300)}") from None
