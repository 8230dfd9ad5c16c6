"""`kind: lm_harness`: LM Evaluation Harness tasks scored per checkpoint on the device mesh.

    suite = HarnessSuite(HarnessSuite.Config.from_mapping({"tasks": ["pydoc_cloze"]}), adapter=adapter,
                         mesh=mesh, name="harness", output_dir="runs/eval")
    result = suite.run(params, step=300)     # every process of the job calls it
    result.metrics["pydoc_cloze/acc"], result.samples["pydoc_cloze"][0]["resps"]
    suite.close()

Built once: tokenizer, tasks (loaded and checked), the compiled program (traced at first use, once
per row width). Each `run` is lm-eval's own `evaluate` on process 0 with the same task objects;
every other process follows, running the same batches on its devices, and returns the same
metrics (without the per-sample records, which only process 0 holds).

With `output_dir` and `stream` given (and `resume` on), process 0 keeps the run's answers in
``answers.sqlite`` there, scoped by the stream, the step, the tokenizer, max_length, the row cut
and the task versions; a later attempt at the same step computes only what is missing. Whoever
stores the result discards them (`tracker_eval.ledger.answers.discard_answers` by stream and step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tracker_eval.errors import ConfigError, one_line
from tracker_eval.evaluation import agreement
from tracker_eval.evaluation.evaluator import EvalAborted
from tracker_eval.evaluation.models import ModelAdapter
from tracker_eval.evaluation.sharding import batch_shards, place_params
from tracker_eval.ledger.answers import AnswerStore, answer_scope
from tracker_eval_lm_harness.config import HarnessConfig
from tracker_eval_lm_harness.engine import Engine
from tracker_eval_lm_harness.offline import prepare_environment
from tracker_eval_lm_harness.results import json_safe, metric_values
from tracker_eval_lm_harness.resume import FLUSH_S, file_identity
from tracker_eval_lm_harness.rows import width_ladder
from tracker_eval_lm_harness.seeds import Seeds
from tracker_eval_lm_harness.tokenizer import load_tokenizer

LOG = logging.getLogger(__name__)
_SERIALS = itertools.count()


@dataclasses.dataclass(frozen=True)
class HarnessResult:
    """One checkpoint's harness scores.

    Attributes:
      metrics: `<task>/<metric>` (or `<task>/<filter>/<metric>`) -> value, groups included.
      samples: task -> lm-eval's per-sample records, JSON-safe (empty on processes other than 0).
      provenance: compiled shapes, request counts, timings, lm-eval's versions and n-samples.
    """

    metrics: dict[str, float]
    samples: dict[str, list[dict[str, Any]]]
    provenance: dict[str, Any]


class HarnessSuite:
    """LM Evaluation Harness tasks served by a causal LM on a device mesh."""

    Config = HarnessConfig

    def __init__(
        self, config: HarnessConfig, *, adapter: ModelAdapter, mesh: jax.sharding.Mesh, name: str = "harness",
        output_dir: str | None = None, stream: str | None = None,
    ) -> None:
        """Builds the tokenizer, the tasks and the engine.

        Args:
          config: the suite's options.
          adapter: the stream's model: `apply_fn({"params": p}, tokens[, segment_ids=, positions=])`
            -> logits (batch, length, vocab).
          mesh: the (data, fsdp, tensor) evaluation mesh; batches are split over data x fsdp.
          name: the suite's name.
          output_dir: the stream's output folder: the suite keeps its answers there (``answers.sqlite``)
            while a step is evaluated, when `stream` is given too; records are returned.
          stream: the suite's ledger stream (`tracker_eval.identity.answer_stream`); None = keep no answers.

        Raises:
          ConfigError: unknown tasks, unreadable tokenizer, tasks the suite cannot serve.
        """
        self.output_dir = output_dir
        self.stream = stream
        self.config = config
        self.name = name
        self.mesh = mesh
        self.adapter = adapter
        self._scratch = tempfile.mkdtemp(prefix="suite-", dir=prepare_environment())
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.widths = width_ladder(config.max_length)
        unit = math.lcm(batch_shards(mesh), jax.process_count())
        self.rows = -(-config.batch_size // unit) * unit
        self.engine = Engine(adapter.apply_fn, mesh, rows=self.rows, packing=config.packing)
        self._serial = next(_SERIALS)  # same on every process: they build suites in the same order
        self._calls = 0
        from tracker_eval_lm_harness.tasks import TaskSet  # noqa: PLC0415 - imports lm-eval, after the switches

        eos = self.tokenizer.decode([self.tokenizer.eot_token_id], skip_special_tokens=False)
        self.seeds = Seeds(random_seed=config.random_seed, numpy_seed=config.numpy_random_seed)
        self.tasks = TaskSet(config, eos=eos, scratch=self._scratch, seeds=self.seeds)
        self._checked = False

    def run(self, params: Any, *, step: int, exchange: agreement.Exchange | agreement.Solo | None = None,
            should_abort: Callable[[], bool] | None = None) -> HarnessResult:
        """Scores every task on `params`; called by every process of the job.

        Args:
          params: the model's params (placed on the mesh here if they are not already).
          step: the checkpoint's step (recorded in the provenance).
          exchange: this attempt's agreement among processes (the pipeline's per suite); by default
            one is opened and closed here, keyed by the suite and its count of runs.
          should_abort: process 0 abandons the run between batches once it returns True.

        Raises:
          ConfigError: the model breaks the contract (logits shape, vocab, packing arguments).
          ValueError: a request the suite cannot serve, with a one-line reason.
          EvalAborted: `should_abort` said so on process 0 (on every process).
          PeerFailedError: another process failed this run (its reason in the message).
        """
        self._calls += 1
        prefix = f"tracker_eval/harness-{self._serial}/{int(step)}/{self._calls}"
        with agreement.scope(exchange, lambda: prefix) as opened:
            self.engine.begin(opened, should_abort=should_abort)
            try:
                return self._run(params, step=step)
            except (EvalAborted, agreement.PeerFailedError) as error:
                if isinstance(error, EvalAborted) and jax.process_index() == 0:
                    self.engine.stopped(one_line(error, limit=200))
                raise
            except BaseException as error:
                if opened.solo:
                    raise
                try:  # every process learns of it at its next wait, instead of waiting in a broadcast
                    opened.fail(error)
                except Exception as unreported:  # noqa: BLE001 - the store is gone: the job is ending
                    LOG.warning("tracker-eval: could not tell the other processes that this one failed: %s",
                                one_line(unreported, limit=200))
                raise

    def _run(self, params: Any, *, step: int) -> HarnessResult:
        start = time.perf_counter()
        params = place_params(params, self.mesh, rule="auto")
        if not self._checked:
            self._check_model(params)
            self._checked = True
        compiled_before = len(self.engine.compiled_shapes)
        if jax.process_index() != 0:
            shared = json.loads(self.engine.follow(params))
            return HarnessResult(metrics=shared["metrics"], samples={}, provenance=shared["provenance"])
        from lm_eval import evaluator  # noqa: PLC0415 - heavy; imports `datasets`

        from tracker_eval_lm_harness.lm import HarnessLM  # noqa: PLC0415

        with contextlib.ExitStack() as stack:
            answers = self._answers(step)
            if answers is not None:
                stack.enter_context(answers)
            lm = HarnessLM(tokenizer=self.tokenizer, engine=self.engine, params=params,
                           max_length=self.config.max_length, widths=self.widths, packing=self.config.packing,
                           answers=answers)
            self.engine.device_seconds = 0.0
            self.tasks.reset()
            with self.seeds.running():
                results = evaluator.evaluate(lm, self.tasks.loaded, limit=self.config.limit,
                                             bootstrap_iters=self.config.bootstrap_iters, log_samples=True)
        metrics = metric_values(results)
        seconds = time.perf_counter() - start
        provenance = {
            "step": int(step),
            "lm_eval_version": importlib.metadata.version("lm_eval"),
            "tokenizer": self.tokenizer.name,
            "max_length": self.config.max_length,
            "rows_per_batch": self.rows,
            "packing": self.config.packing,
            "compiled_shapes": [list(shape) for shape in self.engine.compiled_shapes],
            "compiles_this_run": len(self.engine.compiled_shapes) - compiled_before,
            "requests": dict(lm.requests),
            "answers_reused": lm.reused,
            "answers_kept": lm.kept,
            "score_rows": lm.rows_scored,
            "score_segments": lm.segments_scored,
            "n_samples": results.get("n-samples", {}),
            "versions": {k: str(v) for k, v in results.get("versions", {}).items()},
            "n_shot": results.get("n-shot", {}),
            "groups": self.tasks.groups(),
            "seconds": seconds,
            "lm_seconds": lm.seconds,
            "device_seconds": self.engine.device_seconds,
            "lm_eval_overhead_share": max(0.0, 1.0 - lm.seconds / seconds) if seconds > 0 else 0.0,
        }
        provenance = json_safe(provenance)
        self.engine.finish(json.dumps({"metrics": metrics, "provenance": provenance}))
        return HarnessResult(metrics=metrics, samples=json_safe(results.get("samples") or {}), provenance=provenance)

    def _answers(self, step: int) -> AnswerStore | None:
        """Process 0's store of this step's answers, or None (no stream, or `resume: false`)."""
        if not self.config.resume or self.output_dir is None or self.stream is None:
            return None
        identity = {"tokenizer": file_identity(self.tokenizer.name), "max_length": self.config.max_length,
                    "rows": self.rows, "packing": self.config.packing, "tasks": self.tasks.versions(),
                    "lm_eval": importlib.metadata.version("lm_eval")}
        scope = answer_scope(stream=self.stream, step=step, identity=identity)
        return AnswerStore(self.output_dir, scope=scope, stream=self.stream, step=step, flush_s=FLUSH_S)

    def _check_model(self, params: Any) -> None:
        """The model contract, checked on shapes only (nothing runs)."""
        apply_fn = self.adapter.apply_fn
        tokens = jax.ShapeDtypeStruct((self.rows, self.widths[0]), jnp.int32)
        extra = {"segment_ids": tokens, "positions": tokens} if self.config.packing else {}
        try:
            out = jax.eval_shape(lambda p, t, kw: apply_fn({"params": p}, t, **kw), params, tokens, extra)
        except TypeError as error:
            if not self.config.packing:
                raise
            raise ConfigError(
                "packing: true calls the model with segment_ids= and positions=, which it does not accept "
                f"({one_line(error, limit=200)}); set packing: false or give the model those arguments"
            ) from None
        shape = getattr(out, "shape", None)
        if shape is None or len(shape) != 3 or tuple(shape[:2]) != tokens.shape:
            raise ConfigError(
                f"the model must map int32 tokens {tokens.shape} to logits (batch, length, vocab); it returned "
                f"{shape if shape is not None else type(out).__name__}"
            )
        if shape[2] < self.tokenizer.vocab_size:
            raise ConfigError(
                f"the model's logits cover {shape[2]} tokens but tokenizer {self.tokenizer.name!r} has "
                f"{self.tokenizer.vocab_size}; use the tokenizer the model was trained with"
            )

    def close(self) -> None:
        """Removes the suite's scratch files (the shims of include_path)."""
        shutil.rmtree(self._scratch, ignore_errors=True)
