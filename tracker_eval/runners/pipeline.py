"""One evaluation stream built from a config: resolve user code, build the mesh and the jitted
evaluation once, then evaluate checkpoints (or live states) one after another.

    pipeline = Pipeline(load_config("configs/demo.yaml"))
    result = pipeline.evaluate_step(300)          # restore params only, onto the mesh, evaluate
    result = pipeline.evaluate_state(state, checkpoint="in-training")   # no restore

The watcher, `tracker-eval eval` and `InTrainingEvaluation` all evaluate through this class, so
they share one compiled step, one definition of provenance and one cache of the eval set (`cache`:
the data factory runs once per process, not once per checkpoint, while the set fits).

With several suites the params are restored once and every suite evaluates them, one after another
in config order; one suite's failure is its own (`evaluate_suites` returns it in its place):

    outcomes = pipeline.evaluate_suites(300)       # {"val": EvalResult, "test": ValueError(...)}
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from tracker_eval.config import EvalConfig
from tracker_eval.evaluation import agreement
from tracker_eval.evaluation.cache import BatchCache, CachedData
from tracker_eval.evaluation.evaluator import EvalAborted, ExtendedEvaluation, ResultListener
from tracker_eval.evaluation.models import adapt_model, build_model
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.evaluation.sharding import make_mesh, shardings_for
from tracker_eval.evaluation.state import EvalState
from tracker_eval.identity import run_hash
from tracker_eval.imports import resolve
from tracker_eval.locations import join_path
from tracker_eval.runners.suites import EvalSuite, build_suites, resolve_suite

_STREAMS = itertools.count()


@dataclasses.dataclass(frozen=True)
class Components:
    """User code named by the config, resolved (imports fail at config load, naming the path).

    Without suites, the eval function, data factory and finalize of the one evaluation; with
    suites, each suite's own (`tracker_eval.runners.suites.resolve_suite`) in `suites`.
    """

    model_factory: Callable[..., Any]
    eval_function: Callable[..., Any] | None = None
    data_factory: Callable[..., Iterable[Any]] | None = None
    finalize: Callable[[dict[str, float]], Mapping[str, float]] | None = None
    suites: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def resolve(cls, config: EvalConfig) -> Components:
        """Imports everything the config names (and checks plug-in suites' options).

        Raises:
          ConfigError: a path that does not import, naming the config key.
        """
        model_factory = resolve(config.model, key="model")
        if config.has_suites:
            return cls(model_factory=model_factory,
                       suites={suite.name: resolve_suite(config, suite.name) for suite in config.suites})
        return cls(
            model_factory=model_factory,
            eval_function=resolve(config.eval_function, key="eval_function"),
            data_factory=resolve(config.data, key="data"),
            finalize=resolve(config.finalize, key="finalize") if config.finalize else None,
        )


class Pipeline:
    """Config -> restored params -> one `EvalResult` per suite, each suite compiled once per run.

    Args:
      config: the run's config.
      components: its resolved user code (resolved here when not given).
      listeners: called with each eval-kind result.
      progress: progress bars (True), log lines (False) or auto (None).
      suites: build only these suites (default all, in config order).
    """

    def __init__(
        self,
        config: EvalConfig,
        *,
        components: Components | None = None,
        listeners: Iterable[ResultListener] = (),
        progress: bool | None = None,
        suites: Iterable[str] | None = None,
    ) -> None:
        self.config = config
        self.components = components or Components.resolve(config)
        self.mesh = make_mesh(config.mesh)
        self.adapter = adapt_model(build_model(self.components.model_factory, config.model_kwargs, mesh=self.mesh))
        self.suites = build_suites(config, self.components, adapter=self.adapter, mesh=self.mesh, names=suites,
                                   listeners=listeners, progress=progress)
        self.config_hash = run_hash(config)
        # Names this stream's keys in the runtime's key-value store. Every process builds its
        # pipelines in the same order, so the count agrees even where paths or data_kwargs differ
        # between hosts (a hash of the config would not).
        self.stream_key = f"stream-{next(_STREAMS)}"
        self._attempts = 0
        self.restores = 0
        self._step_names: Any = None  # how the root names its steps, read at the first restore

    @property
    def evaluation(self) -> ExtendedEvaluation:
        """The first eval-kind suite's evaluation (the only one of a config without suites)."""
        return self._first_eval().evaluation

    @property
    def cache(self) -> BatchCache:
        """The first eval-kind suite's eval-set cache."""
        return self._first_eval().cache

    def _first_eval(self) -> EvalSuite:
        for suite in self.suites.values():
            if isinstance(suite, EvalSuite):
                return suite
        raise AttributeError("this pipeline has no suite of kind eval")

    def set_should_abort(self, should_abort: Callable[[], bool]) -> None:
        """Lets every suite, of any kind, stop between batches when `should_abort()` says so."""
        for suite in self.suites.values():
            if isinstance(suite, EvalSuite):
                suite.evaluation.should_abort = should_abort
            else:
                suite.should_abort = should_abort

    def data(self) -> CachedData:
        """The first eval-kind suite's slice of its split, behind its cache."""
        return self._first_eval().data()

    def checkpoint_path(self, step: int) -> str:
        """Where `step` lives: ``<checkpoint_dir>/<step folder>``, a URL when checkpoint_dir is one."""
        folder = str(step) if self._step_names is None else self._step_names.folder(step)
        return join_path(self.config.checkpoint_dir, folder)

    def step_names(self) -> Any:
        """The root's `StepNames`: as `checkpoint.step_prefix` sets, else detected once (a root
        that holds a step keeps its naming)."""
        if self._step_names is None:
            from tracker_eval.checkpoints.listing import read_step_names  # noqa: PLC0415 - orbax is heavy
            from tracker_eval.checkpoints.roots import StepNames  # noqa: PLC0415

            configured = StepNames.configured(self.config.checkpoint.step_prefix,
                                              self.config.checkpoint.step_format_fixed_length)
            self._step_names = read_step_names(self.config.checkpoint_dir, step_names=configured)
        return self._step_names

    def restore(self, step: int) -> EvalState:
        """Params (and named mutable collections) of `step`, restored straight onto the mesh."""
        from tracker_eval.checkpoints import restore as checkpoints  # noqa: PLC0415 - orbax is heavy

        self.restores += 1
        params, mutable = checkpoints.restore_eval_variables(
            self.config.checkpoint_dir,
            step,
            item=self.config.checkpoint.item,
            params_path=self.config.checkpoint.params,
            mutable=self.config.checkpoint.mutable,
            shardings_for=lambda tree: shardings_for(tree, self.mesh, rule=self.config.params_sharding),
            step_names=self.step_names(),
        )
        return EvalState.create(
            apply_fn=self.adapter.apply_fn,
            params=params,
            mutable_variables=mutable or None,
            step=step,
            rng=jax.random.key(self.config.seed),
        )

    def provenance(self, **extra: Any) -> dict[str, Any]:
        """Provenance fields the run knows (each suite adds its hash and split, the evaluation
        versions, mesh and host)."""
        return {"checkpoint_dir": self.config.checkpoint_dir, **extra}

    def exchange_prefix(self, step: int, attempt: int | None) -> str:
        """Key prefix of one evaluation attempt: `tracker_eval/<stream>/<step>/<attempt>`.

        Args:
          step: the step evaluated.
          attempt: the same number on every process (e.g. the decision that started it); by
            default a count of this pipeline's evaluations, which every process keeps in step.
        """
        self._attempts += 1
        return f"tracker_eval/{self.stream_key}/{step}/{self._attempts if attempt is None else attempt}"

    def evaluate_step(self, step: int, *, attempt: int | None = None) -> EvalResult:
        """Restores and evaluates one checkpoint step (the only suite of a config without suites).

        With several processes, a process that cannot restore the step or open its data stops the
        attempt on every process (`agreement.PeerFailedError` on the others) instead of leaving
        them waiting in a collective.
        """
        (suite,) = self.suites.values()
        with agreement.scope(None, lambda: self.exchange_prefix(step, attempt)) as exchange:
            with exchange.guard():
                start = time.perf_counter()
                state = self.restore(step)
                restore_s = time.perf_counter() - start
            return suite.evaluate(state, checkpoint=self.checkpoint_path(step),
                                  provenance=self.provenance(restore_s=round(restore_s, 4)), exchange=exchange)

    def evaluate_suites(
        self, step: int, *, suites: Iterable[str] | None = None, attempt: int | None = None
    ) -> dict[str, EvalResult | Exception]:
        """Restores `step` once, then evaluates each suite (default all) in config order.

        Returns:
          Each suite's result, or the exception it raised (the other suites still ran).

        Raises:
          EvalAborted: a stop was requested (the remaining suites are not run).
          Exception: the restore failed (no suite ran), e.g. `CheckpointVanishedError`.
        """
        base = self.exchange_prefix(step, attempt)
        with agreement.scope(None, lambda: f"{base}/restore") as exchange, exchange.guard():
            start = time.perf_counter()
            state = self.restore(step)
            restore_s = round(time.perf_counter() - start, 4)
        return self._run_suites(state, suites, base=base, checkpoint=self.checkpoint_path(step),
                                provenance=self.provenance(restore_s=restore_s))

    def evaluate_state(
        self, state: EvalState, *, checkpoint: str, attempt: int | None = None, **provenance: Any
    ) -> EvalResult:
        """Evaluates a live state (params already in memory, e.g. inside training): the only suite
        of a config without suites."""
        (suite,) = self.suites.values()
        state = self._complete(state)
        with agreement.scope(None, lambda: self.exchange_prefix(int(state.step), attempt)) as exchange:
            return suite.evaluate(state, checkpoint=checkpoint, provenance=self.provenance(**provenance),
                                  exchange=exchange)

    def evaluate_state_suites(
        self, state: EvalState, *, checkpoint: str, suites: Iterable[str] | None = None,
        attempt: int | None = None, **provenance: Any,
    ) -> dict[str, EvalResult | Exception]:
        """`evaluate_suites` for a live state: every suite (default all) on params already in memory."""
        state = self._complete(state)
        base = self.exchange_prefix(int(state.step), attempt)
        return self._run_suites(state, suites, base=base, checkpoint=checkpoint,
                                provenance=self.provenance(**provenance))

    def _complete(self, state: EvalState) -> EvalState:
        if state.apply_fn is None:
            state = state.replace(apply_fn=self.adapter.apply_fn)
        if state.rng is None:
            state = state.replace(rng=jax.random.key(self.config.seed))
        return state

    def _run_suites(self, state: EvalState, names: Iterable[str] | None, *, base: str, checkpoint: str,
                    provenance: dict[str, Any]) -> dict[str, EvalResult | Exception]:
        wanted = list(self.suites) if names is None else [n for n in self.suites if n in set(names)]
        outcomes: dict[str, EvalResult | Exception] = {}
        for name in wanted:
            # Every suite has its own agreement: one that fails on any process fails on all of
            # them, and the next suite starts together again.
            try:
                with agreement.scope(None, lambda n=name: f"{base}/suite/{n}") as exchange:
                    outcomes[name] = self.suites[name].evaluate(state, checkpoint=checkpoint,
                                                                provenance=provenance, exchange=exchange)
            except EvalAborted:
                raise
            except Exception as error:  # noqa: BLE001 - one suite's failure is recorded, the others run
                outcomes[name] = error
        return outcomes

    def close(self) -> None:
        """Releases what the suites hold (plug-in scratch files)."""
        for suite in self.suites.values():
            suite.close()
