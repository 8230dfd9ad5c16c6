"""`ExtendedEvaluation`: the sharded, jitted evaluation whose final metrics everything reports.

The surface follows `xlstm_jax.trainer.callbacks.extended_evaluation` (eval_function,
init_eval_metrics, aggregate_metrics, eval_model, finalize_metrics, on_extended_evaluation_start
/ _end), minus its known defects: reductions are global (exact under tensor parallelism), the step
compiles once per shape (short last batch padded and masked), reduced metrics stay on device until
the end, per-example rows are copied asynchronously and concatenated once, Max/Min start at -inf/
+inf, and sums are compensated so counts stay exact past 2^31.

    evaluation = ExtendedEvaluation(model=adapt_model(make_model()), mesh=mesh, batch_size=64,
                                    eval_function=eval_fn)
    result = evaluation.evaluate(EvalState.create(apply_fn=..., params=params, step=100), loader)
    result.metrics["loss"]
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from tracker_eval.evaluation import activity, agreement, transfer, xlstm_format
from tracker_eval.evaluation import batches as batches_lib
from tracker_eval.evaluation import metrics as metric_lib
from tracker_eval.evaluation import step as step_lib
from tracker_eval.evaluation.cache import CachedData
from tracker_eval.evaluation.models import ModelAdapter, adapt_model
from tracker_eval.evaluation.result import EvalResult, runtime_provenance
from tracker_eval.evaluation.sharding import BatchPlacer, place_params, put_replicated
from tracker_eval.evaluation.state import EvalState
from tracker_eval.paired import with_stderr

LOG = logging.getLogger(__name__)

EvalFunction = Callable[[Any, Callable[..., Any], Any, jax.Array], tuple[Mapping[str, Any], Any]]
ResultListener = Callable[[EvalResult], None]
_SERIALS = itertools.count()


class EvalError(RuntimeError):
    """The evaluation itself failed (user code raised, data was unusable)."""


class EvalAborted(RuntimeError):
    """`should_abort` asked the evaluation to stop between batches (e.g. on SIGTERM)."""


class ExtendedEvaluation:
    """Evaluates an `EvalState` over a data loader on a device mesh.

    Either pass `eval_function` or subclass and override `eval_function`. Results go to every
    listener through `on_extended_evaluation_end` (the logger fan-out attaches there).
    """

    def __init__(
        self,
        *,
        model: ModelAdapter | Callable[..., Any],
        mesh: jax.sharding.Mesh,
        batch_size: int,
        eval_function: EvalFunction | None = None,
        finalize_fn: Callable[[dict[str, float]], Mapping[str, float]] | None = None,
        params_sharding: str = "auto",
        exemplary_batch: Any = None,
        listeners: Iterable[ResultListener] = (),
        progress: bool | None = None,
        prefetch_depth: int = 2,
        max_in_flight: int = 2,
    ) -> None:
        """Builds the evaluation and its jitted step (compiled on first use, once per shape).

        Args:
          model: a `ModelAdapter` or anything `adapt_model` accepts (linen/nnx Module, apply_fn).
          mesh: the (data, fsdp, tensor) mesh.
          batch_size: global batch size.
          eval_function: (params, apply_fn, batch, rng) -> (dict[str, Metric], mutable); metrics may
            also be xlstm-jax's {"value", "count"} dicts or scalars (`xlstm_format`), batches any pytree.
          finalize_fn: adds derived metrics from the scalar ones (e.g. perplexity = exp(loss)).
          params_sharding: auto | replicated | fsdp placement of params on the mesh.
          exemplary_batch: a host batch for shape inference; else the first batch is used.
          listeners: called with each `EvalResult` at `on_extended_evaluation_end`.
          progress: a progress bar (True), log lines (False) or auto by terminal (None).
          prefetch_depth: host batches placed ahead of the running step.
          max_in_flight: eval steps dispatched but not finished before the loop waits for the
            oldest (a wait, no transfer). Unbounded dispatch of collective programs deadlocks
            XLA's CPU runtime with several fake devices on few cores; 2 keeps the device busy.
        """
        self.adapter = model if isinstance(model, ModelAdapter) else adapt_model(model)
        self.mesh = mesh
        self.placer = BatchPlacer(mesh, global_batch_size=batch_size)
        self._eval_fn = eval_function
        self.finalize_fn = finalize_fn
        self.params_sharding = params_sharding
        self.listeners: list[ResultListener] = list(listeners)
        self.progress = progress
        self.prefetch_depth = prefetch_depth
        self.max_in_flight = max(1, max_in_flight)
        self.should_abort: Callable[[], bool] | None = None
        self._serial = next(_SERIALS)  # same on every process: they build evaluations in the same order
        self._calls = 0
        self._exchange: agreement.Exchange | agreement.Solo | None = None
        self.state: EvalState | None = None
        self.trace_count = 0
        self.last_result: EvalResult | None = None
        self._kinds: dict[str, str] | None = None
        self._eval_metric_shapes: Any = None
        self._context: dict[str, Any] = {}
        self._reader = xlstm_format.MetricReader()
        self.exmp_batch = (
            None if exemplary_batch is None else self.create_modified_exemplary_batch(exemplary_batch)
        )
        self.create_jitted_functions()

    def create_modified_exemplary_batch(self, exmp_batch: Any) -> Any:
        """Hook to add eval-only fields to the exemplary batch; returns it unchanged by default."""
        return exmp_batch

    def eval_function(
        self, params: Any, apply_fn: Callable[..., Any], batch: Any, rng: jax.Array
    ) -> tuple[Mapping[str, Any], Any]:
        """Computes the metrics of one batch; override in a subclass or pass `eval_function`.

        Returns:
          (dict of `tracker_eval.metrics` kinds or xlstm-jax metrics, mutable variables or None).
        """
        if self._eval_fn is None:
            raise NotImplementedError("pass eval_function=... or override ExtendedEvaluation.eval_function")
        return self._eval_fn(params, apply_fn, batch, rng)

    def create_jitted_functions(self) -> None:
        """Jits the eval step once; the accumulator is donated and pinned replicated.

        Pinning the output shardings to the input shardings is what keeps the second batch
        from compiling again (XLA may otherwise pick another layout for the new accumulator).
        """
        self.eval_step = jax.jit(self.create_evaluation_step_function(), donate_argnames=("metrics",))

    def create_evaluation_step_function(self) -> Callable[..., Any]:
        """The (un-jitted) step: one batch's metrics folded into the device accumulator."""

        def traced() -> None:
            self.trace_count += 1  # runs at trace time only: counts compilations of the step

        return step_lib.build_eval_step(self._batch_metrics, mesh=self.mesh, shards=self.placer.shards,
                                        on_trace=traced)

    def _batch_metrics(self, params: Any, mutable: Any, batch: Any, rng: jax.Array) -> Mapping[str, Any]:
        apply_fn = self.adapter.bind(mutable)
        return self._reader(lambda rows: self.eval_function(params, apply_fn, rows, rng), batch)

    def init_eval_metrics(
        self, batch: Any = None, alternative_eval_step: Callable[..., Any] | None = None
    ) -> dict[str, dict[str, jax.Array]]:
        """Zero accumulators, shapes from `jax.eval_shape` (no compile, no extra step).

        Args:
          batch: a placed global batch; defaults to the exemplary batch.
          alternative_eval_step: a function (params, mutable, batch, rng) -> metrics dict to infer
            the metric structure from instead of `eval_function`.
        """
        state = self._require_state()
        if self._eval_metric_shapes is None:
            if batch is None:
                if self.exmp_batch is None:
                    raise EvalError("no batch to infer metric shapes from: pass exemplary_batch or a batch")
                batch, _, _ = self.placer.place(self.exmp_batch)
            fn = alternative_eval_step or self._batch_metrics
            with jax.set_mesh(self.mesh):
                self._eval_metric_shapes = jax.eval_shape(
                    fn, state.params, state.mutable_variables, batch, state.rng
                )
            self._kinds = metric_lib.kinds_of(self._eval_metric_shapes)
        return step_lib.zero_accumulator(self._eval_metric_shapes, mesh=self.mesh, shards=self.placer.shards)

    def aggregate_metrics(
        self, aggregated_metrics: Mapping[str, Any], eval_metrics: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Host-side merge of a fetched accumulator (and per-example rows) into `aggregated_metrics`.

        Runs once per `eval_model` (not per batch); merging again combines several loaders.
        """
        return metric_lib.merge_fetched(self._kinds or {}, aggregated_metrics, eval_metrics)

    def finalize_metrics(self, aggregated_metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Final numbers: scalars as Python numbers, per-example metrics as arrays, derived added."""
        return metric_lib.finalize_all(self._kinds or {}, aggregated_metrics, self.finalize_fn)

    def eval_model(self, data_loader: Iterable[Any], mode: str = "test", epoch_idx: int = 0) -> dict[str, Any]:
        """Evaluates the current state over `data_loader` and returns the final metrics.

        Calls `on_extended_evaluation_start` before and `on_extended_evaluation_end` after.

        Raises:
          EvalError: the loader yielded nothing.
        """
        self.on_extended_evaluation_start()
        # The mesh is in context so eval functions may constrain activations with bare
        # PartitionSpecs (tensor parallelism), as they would inside a training step.
        with agreement.scope(self._exchange, lambda: self._exchange_prefix(self.state)) as exchange, \
                jax.set_mesh(self.mesh), activity.evaluating(), exchange.guard():
            final = self._eval_batches(data_loader, exchange=exchange, mode=mode, epoch_idx=epoch_idx)
        self.on_extended_evaluation_end(final)
        return final

    def _exchange_prefix(self, state: EvalState | None) -> str:
        # Counted at every call on every process, failed ones included, so the names stay in step.
        self._calls += 1
        return f"tracker_eval/evaluation-{self._serial}/{-1 if state is None else int(state.step)}/{self._calls}"

    def _check_abort(self) -> None:
        if self.should_abort is not None and self.should_abort():
            raise EvalAborted("evaluation abandoned at a stop request")

    def _eval_batches(
        self, data_loader: Iterable[Any], *, exchange: Any, mode: str, epoch_idx: int
    ) -> dict[str, Any]:
        state = self._require_state()
        start = time.perf_counter()
        traces_before = self.trace_count
        if isinstance(data_loader, CachedData):  # the eval set may be replayed from a BatchCache
            placed = data_loader.placed(self.placer, depth=self.prefetch_depth)
            self._context["data_from_cache"] = data_loader.replayed
        else:
            placed = batches_lib.placed_batches(data_loader, self.placer.place, depth=self.prefetch_depth)
        # Several processes run a batch only once all hold it; the metric structure is traced first.
        placed = exchange.admit(placed, before_round=self._check_abort,
                                first=lambda first: self.init_eval_metrics(first[0]))
        accumulator, rows_out, count = step_lib.run_steps(
            self.eval_step, state, batches_lib.progress(placed, mode=mode, show=self.progress),
            init=self.init_eval_metrics, max_in_flight=self.max_in_flight,
            before_batch=self._check_abort if exchange.solo else None,  # else checked between rounds
        )
        if accumulator is None:
            raise EvalError(f"the {mode} data yielded no batches (epoch {epoch_idx}); check the data factory and split")
        # The one device-to-host transfer of reduced metrics; per-example rows to process 0.
        reduced, per_example = transfer.finish(accumulator, rows_out, exchange)
        reduced.pop(step_lib.BATCH_INDEX)
        aggregated = self.aggregate_metrics({}, {"reduced": reduced, "per_example": per_example})
        final = self.finalize_metrics(aggregated)
        self._context["eval_wall_s"] = time.perf_counter() - start
        self._context["batches"] = count
        self._context["step_compiles"] = self.trace_count - traces_before
        return final

    def evaluate(
        self,
        state: EvalState,
        data_loader: Iterable[Any],
        *,
        checkpoint: str = "",
        provenance: Mapping[str, Any] | None = None,
        exchange: agreement.Exchange | agreement.Solo | None = None,
    ) -> EvalResult:
        """Sets the state, runs `eval_model`, and returns the `EvalResult` handed to listeners.

        Args:
          exchange: this attempt's agreement among processes (`agreement.open_exchange`, e.g.
            keyed by stream, step and attempt); by default one is opened and closed here.
        """
        with agreement.scope(exchange, lambda: self._exchange_prefix(state)) as self._exchange:
            try:
                with self._exchange.guard():
                    self.set_state(state)
                self._context = {"checkpoint": checkpoint, "provenance": dict(provenance or {})}
                self.eval_model(data_loader)
            finally:
                self._exchange = None
        assert self.last_result is not None  # set by on_extended_evaluation_end
        return self.last_result

    def set_state(self, state: EvalState) -> None:
        """Places params and mutable collections on the mesh (no copy where already placed)."""
        params = place_params(state.params, self.mesh, rule=self.params_sharding)
        mutable = state.mutable_variables
        if mutable is not None:
            mutable = put_replicated(mutable, self.mesh)
        rng = put_replicated(state.rng, self.mesh)
        self.state = state.replace(params=params, mutable_variables=mutable, rng=rng)

    def on_extended_evaluation_start(self) -> None:
        """Hook called before the first batch."""

    def on_extended_evaluation_end(self, final_metrics: Mapping[str, Any]) -> None:
        """Builds the `EvalResult` and hands it to every listener.

        A raising listener is logged and does not stop the others; fan-out with deadlines and
        retries lives in the logger layer, which attaches here as one listener.
        """
        state = self._require_state()
        scalars = {k: v for k, v in final_metrics.items() if not isinstance(v, np.ndarray)}
        per_example = {k: v for k, v in final_metrics.items() if isinstance(v, np.ndarray)}
        provenance = {**self.base_provenance(), **self._context.get("provenance", {})}
        for key in ("eval_wall_s", "batches", "step_compiles", "data_from_cache"):
            if key in self._context:
                provenance[key] = self._context[key]
        self.last_result = EvalResult(
            step=int(state.step),
            checkpoint=self._context.get("checkpoint", ""),
            metrics=with_stderr(scalars, per_example),
            per_example=per_example,
            provenance=provenance,
        )
        for listener in self.listeners:
            try:
                listener(self.last_result)
            except Exception as error:  # noqa: BLE001 - one listener must not stop the others
                LOG.warning("result listener %r failed: %s", listener, error)

    def base_provenance(self) -> dict[str, Any]:
        """Versions, mesh and host: what makes a number reproducible."""
        return runtime_provenance(self.mesh, global_batch_size=self.placer.batch_size)

    def _require_state(self) -> EvalState:
        if self.state is None:
            raise EvalError("no state to evaluate: call set_state(EvalState...) or evaluate(state, loader)")
        return self.state
