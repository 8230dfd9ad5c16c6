"""The suites of a run: each evaluates the params that one restore put on the mesh.

    runners = build_suites(config, components, adapter=adapter, mesh=mesh)
    result = runners["val"].evaluate(state, checkpoint="/ckpt/300", provenance={}, exchange=exchange)

A suite kind is a class found by name: the built-in ``eval`` (`EvalSuite`, today's
`ExtendedEvaluation` with its data and cache) or a plug-in registered in the entry-point group
``tracker_eval.suites`` (e.g. ``lm_harness``), which implements `SuiteKind`. Every suite is built
once per run, so its compiled step is reused for every checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax

from tracker_eval.config import EvalConfig
from tracker_eval.config.suites import EVAL_KIND, load_kind
from tracker_eval.evaluation.cache import BatchCache, CachedData
from tracker_eval.evaluation.evaluator import ExtendedEvaluation, ResultListener
from tracker_eval.evaluation.models import ModelAdapter
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.evaluation.state import EvalState
from tracker_eval.identity import answer_stream, suite_hash
from tracker_eval.imports import resolve


@runtime_checkable
class SuiteOutput(Protocol):
    """What a plug-in suite returns for one checkpoint (an optional ``samples`` attribute, task ->
    per-sample records, is stored and logged with the result; see `EvalResult.samples`)."""

    metrics: Mapping[str, float]
    provenance: Mapping[str, Any]


@runtime_checkable
class SuiteKind(Protocol):
    """A plug-in suite kind (the seam `tracker_eval_lm_harness.suite.HarnessSuite` implements).

    The class has a ``Config`` with ``from_mapping(options, where=...)`` that checks the suite's
    options (raising `ConfigError`), and is built once per run as
    ``Kind(config, adapter=..., mesh=..., name=..., output_dir=..., stream=...)`` (`stream`:
    `tracker_eval.identity.answer_stream`, which scopes answers a kind keeps in output_dir to resume
    a killed attempt; the stored result discards them). The checked config's optional
    ``numbers_key()`` returns the options that change the numbers, defaults applied: the suite's
    identity (`tracker_eval.identity.suite_numbers`); without it every field counts.
    """

    def run(self, params: Any, *, step: int, exchange: Any, should_abort: Callable[[], bool] | None) -> SuiteOutput:
        """Scores `params` (already on the mesh); called by every process of the job.

        `exchange` is the attempt's `agreement` among processes: a failure on one process must reach
        the others through it (`exchange.fail`, `check`, `agree_ready` before each collective), so
        none waits in a collective its peer never joins; its keys go when the attempt ends.
        `should_abort()` turning True (a stop request) asks the suite to raise `EvalAborted`
        between batches, on every process.
        """

    def close(self) -> None:
        """Releases what the suite holds."""


@dataclasses.dataclass(frozen=True)
class EvalComponents:
    """User code a ``kind: eval`` suite names, resolved (a typo fails at load, naming the key)."""

    eval_function: Callable[..., Any]
    data_factory: Callable[..., Iterable[Any]]
    finalize: Callable[[dict[str, float]], Mapping[str, float]] | None

    @classmethod
    def resolve(cls, config: EvalConfig, *, where: str = "") -> EvalComponents:
        """Imports what `config` (one suite's view, `EvalConfig.for_suite`) names.

        Raises:
          ConfigError: a path that does not import, naming the config key (``suites.val.data``).
        """
        return cls(
            eval_function=resolve(config.eval_function, key=f"{where}eval_function"),
            data_factory=resolve(config.data, key=f"{where}data"),
            finalize=resolve(config.finalize, key=f"{where}finalize") if config.finalize else None,
        )


@dataclasses.dataclass(frozen=True)
class PluginComponents:
    """A plug-in suite's kind class and its checked options."""

    kind: type
    options: Any


def resolve_suite(config: EvalConfig, name: str) -> EvalComponents | PluginComponents:
    """Resolves one suite of a config with suites: imports its code, checks a plug-in's options.

    Raises:
      ConfigError: naming the suite and the key.
    """
    suite = config.suite(name)
    where = f"suites.{name}"
    if suite.kind == EVAL_KIND:
        return EvalComponents.resolve(config.for_suite(name), where=f"{where}.")
    kind = load_kind(suite.kind, where=where)
    options = kind.Config.from_mapping(dict(suite.options), where=where)
    return PluginComponents(kind=kind, options=options)


class EvalSuite:
    """The built-in ``eval`` kind: one `ExtendedEvaluation` (compiled once per run) over its data."""

    def __init__(
        self,
        name: str,
        config: EvalConfig,
        components: EvalComponents,
        *,
        adapter: ModelAdapter,
        mesh: jax.sharding.Mesh,
        identity: str,
        listeners: Iterable[ResultListener] = (),
        progress: bool | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.components = components
        self.identity = identity
        self.evaluation = ExtendedEvaluation(
            model=adapter,
            mesh=mesh,
            batch_size=config.batch_size,
            eval_function=components.eval_function,
            finalize_fn=components.finalize,
            params_sharding=config.params_sharding,
            listeners=listeners,
            progress=progress,
        )
        self.cache = BatchCache(mode=config.cache, max_mb=config.cache_max_mb)

    def data(self) -> CachedData:
        """This process's slice of the suite's split, behind the cache (the factory runs when needed)."""
        return CachedData(self._read_data, cache=self.cache)

    def _read_data(self) -> Iterable[Any]:
        return self.components.data_factory(
            split=self.config.split,
            batch_size=self.config.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            **self.config.data_kwargs,
        )

    def evaluate(
        self, state: EvalState, *, checkpoint: str, provenance: Mapping[str, Any], exchange: Any
    ) -> EvalResult:
        """Evaluates `state` over the suite's data under `exchange` (one attempt's agreement)."""
        with exchange.guard():
            data = self.data()
        provenance = {"config_hash": self.identity, "split": self.config.split, **provenance}
        if self.name:
            provenance["suite"] = self.name
        result = self.evaluation.evaluate(state, data, checkpoint=checkpoint, provenance=provenance,
                                          exchange=exchange)
        return dataclasses.replace(result, suite=self.name) if self.name else result

    def close(self) -> None:
        """Nothing to release: the cache goes with the object."""


class PluginSuite:
    """A plug-in kind behind the same `evaluate` as `EvalSuite`."""

    def __init__(self, name: str, components: PluginComponents, *, adapter: ModelAdapter,
                 mesh: jax.sharding.Mesh, identity: str, output_dir: str, stream: str) -> None:
        self.name = name
        self.identity = identity
        self.impl: SuiteKind = components.kind(components.options, adapter=adapter, mesh=mesh, name=name,
                                               output_dir=output_dir, stream=stream)
        self.should_abort: Callable[[], bool] | None = None

    def evaluate(
        self, state: EvalState, *, checkpoint: str, provenance: Mapping[str, Any], exchange: Any
    ) -> EvalResult:
        """Runs the plug-in on the state's params under the attempt's agreement among processes."""
        start = time.perf_counter()
        out = self.impl.run(state.params, step=int(state.step), exchange=exchange, should_abort=self.should_abort)
        wall = {"eval_wall_s": round(time.perf_counter() - start, 4)}  # as an eval suite's provenance has
        return EvalResult(
            step=int(state.step),
            checkpoint=checkpoint,
            metrics=dict(out.metrics),
            provenance={"config_hash": self.identity, "suite": self.name, **wall, **provenance,
                        **dict(out.provenance)},
            suite=self.name,
            samples=dict(getattr(out, "samples", None) or {}),
        )

    def close(self) -> None:
        self.impl.close()


def build_suites(
    config: EvalConfig,
    components: Any,
    *,
    adapter: ModelAdapter,
    mesh: jax.sharding.Mesh,
    names: Iterable[str] | None = None,
    listeners: Iterable[ResultListener] = (),
    progress: bool | None = None,
) -> dict[str, EvalSuite | PluginSuite]:
    """Builds the config's suites (or those in `names`), in config order.

    Args:
      config: the run's config.
      components: the resolved `tracker_eval.runners.pipeline.Components`.
      adapter: the run's model.
      mesh: the evaluation mesh.
      names: only these suites (`tracker-eval eval --suite`).
      listeners: called with each eval-kind result.
      progress: progress bars of eval-kind suites.
    """
    wanted = None if names is None else set(names)
    built: dict[str, EvalSuite | PluginSuite] = {}
    for suite in config.suite_list():
        if wanted is not None and suite.name not in wanted:
            continue
        identity = suite_hash(config, suite.name)
        if not config.has_suites:
            built[suite.name] = EvalSuite(suite.name, config, EvalComponents(
                components.eval_function, components.data_factory, components.finalize), adapter=adapter,
                mesh=mesh, identity=identity, listeners=listeners, progress=progress)
            continue
        resolved = components.suites[suite.name]
        if isinstance(resolved, EvalComponents):
            built[suite.name] = EvalSuite(suite.name, config.for_suite(suite.name), resolved, adapter=adapter,
                                          mesh=mesh, identity=identity, listeners=listeners, progress=progress)
        else:
            built[suite.name] = PluginSuite(suite.name, resolved, adapter=adapter, mesh=mesh, identity=identity,
                                            output_dir=config.output_dir, stream=answer_stream(config, suite.name))
    return built
