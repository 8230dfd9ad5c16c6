"""One evaluation stream built from a config: resolve user code, build the mesh and the jitted
evaluation once, then evaluate checkpoints (or live states) one after another.

    pipeline = Pipeline(load_config("configs/demo.yaml"))
    result = pipeline.evaluate_step(300)          # restore params only, onto the mesh, evaluate
    result = pipeline.evaluate_state(state, checkpoint="in-training")   # no restore

The watcher, `tracker-eval eval` and `InTrainingEvaluation` all evaluate through this class, so
they share one compiled step, one definition of provenance and one cache of the eval set (`cache`:
the data factory runs once per process, not once per checkpoint, while the set fits).
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
from tracker_eval.evaluation.evaluator import ExtendedEvaluation, ResultListener
from tracker_eval.evaluation.models import adapt_model
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.evaluation.sharding import make_mesh, shardings_for
from tracker_eval.evaluation.state import EvalState
from tracker_eval.imports import resolve
from tracker_eval.locations import join_path

_STREAMS = itertools.count()


@dataclasses.dataclass(frozen=True)
class Components:
    """User code named by the config, resolved (imports fail at config load, naming the path)."""

    model_factory: Callable[..., Any]
    eval_function: Callable[..., Any]
    data_factory: Callable[..., Iterable[Any]]
    finalize: Callable[[dict[str, float]], Mapping[str, float]] | None

    @classmethod
    def resolve(cls, config: EvalConfig) -> Components:
        """Imports everything the config names.

        Raises:
          ConfigError: a path that does not import, naming the config key.
        """
        return cls(
            model_factory=resolve(config.model, key="model"),
            eval_function=resolve(config.eval_function, key="eval_function"),
            data_factory=resolve(config.data, key="data"),
            finalize=resolve(config.finalize, key="finalize") if config.finalize else None,
        )


class Pipeline:
    """Config -> restored params -> `EvalResult`, with one jitted evaluation reused throughout."""

    def __init__(
        self,
        config: EvalConfig,
        *,
        components: Components | None = None,
        listeners: Iterable[ResultListener] = (),
        progress: bool | None = None,
    ) -> None:
        self.config = config
        self.components = components or Components.resolve(config)
        self.mesh = make_mesh(config.mesh)
        self.adapter = adapt_model(self.components.model_factory(**config.model_kwargs))
        self.evaluation = ExtendedEvaluation(
            model=self.adapter,
            mesh=self.mesh,
            batch_size=config.batch_size,
            eval_function=self.components.eval_function,
            finalize_fn=self.components.finalize,
            params_sharding=config.params_sharding,
            listeners=listeners,
            progress=progress,
        )
        self.config_hash = config.config_hash()
        self.cache = BatchCache(mode=config.cache, max_mb=config.cache_max_mb)
        # Names this stream's keys in the runtime's key-value store. Every process builds its
        # pipelines in the same order, so the count agrees even where paths or data_kwargs differ
        # between hosts (a hash of the config would not).
        self.stream_key = f"stream-{next(_STREAMS)}"
        self._attempts = 0

    def data(self) -> CachedData:
        """This process's slice of the eval split, behind the cache (the factory runs when needed)."""
        return CachedData(self._read_data, cache=self.cache)

    def _read_data(self) -> Iterable[Any]:
        return self.components.data_factory(
            split=self.config.split,
            batch_size=self.config.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            **self.config.data_kwargs,
        )

    def checkpoint_path(self, step: int) -> str:
        """Where `step` lives: ``<checkpoint_dir>/<step>``, a URL when checkpoint_dir is one."""
        return join_path(self.config.checkpoint_dir, str(step))

    def restore(self, step: int) -> EvalState:
        """Params (and named mutable collections) of `step`, restored straight onto the mesh."""
        from tracker_eval.checkpoints import restore as checkpoints  # noqa: PLC0415 - orbax is heavy

        params, mutable = checkpoints.restore_eval_variables(
            self.config.checkpoint_dir,
            step,
            item=self.config.checkpoint.item,
            params_path=self.config.checkpoint.params,
            mutable=self.config.checkpoint.mutable,
            shardings_for=lambda tree: shardings_for(tree, self.mesh, rule=self.config.params_sharding),
        )
        return EvalState.create(
            apply_fn=self.adapter.apply_fn,
            params=params,
            mutable_variables=mutable or None,
            step=step,
            rng=jax.random.key(self.config.seed),
        )

    def provenance(self, **extra: Any) -> dict[str, Any]:
        """Provenance fields the config knows (the evaluation adds versions, mesh and host)."""
        return {
            "config_hash": self.config_hash,
            "split": self.config.split,
            "checkpoint_dir": self.config.checkpoint_dir,
            **extra,
        }

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
        """Restores and evaluates one checkpoint step.

        With several processes, a process that cannot restore the step or open its data stops the
        attempt on every process (`agreement.PeerFailedError` on the others) instead of leaving
        them waiting in a collective.
        """
        with agreement.scope(None, lambda: self.exchange_prefix(step, attempt)) as exchange:
            with exchange.guard():
                start = time.perf_counter()
                state = self.restore(step)
                restore_s = time.perf_counter() - start
                data = self.data()
            return self.evaluation.evaluate(
                state,
                data,
                checkpoint=self.checkpoint_path(step),
                provenance=self.provenance(restore_s=round(restore_s, 4)),
                exchange=exchange,
            )

    def evaluate_state(
        self, state: EvalState, *, checkpoint: str, attempt: int | None = None, **provenance: Any
    ) -> EvalResult:
        """Evaluates a live state (params already in memory, e.g. inside training)."""
        if state.apply_fn is None:
            state = state.replace(apply_fn=self.adapter.apply_fn)
        if state.rng is None:
            state = state.replace(rng=jax.random.key(self.config.seed))
        with agreement.scope(None, lambda: self.exchange_prefix(int(state.step), attempt)) as exchange:
            with exchange.guard():
                data = self.data()
            return self.evaluation.evaluate(
                state, data, checkpoint=checkpoint, provenance=self.provenance(**provenance), exchange=exchange
            )
