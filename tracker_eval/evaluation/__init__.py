"""Evaluation: the jitted, sharded evaluation of one state over an eval set, and its result.

`state` (EvalState), `metrics` (metric kinds, device accumulation, host finalize), `xlstm_format`
(xlstm-jax's {"value", "count"} metrics, evaluated row by row), `models` (linen, nnx or apply_fn
behind one call), `sharding` (mesh, batch placement with padding and mask), `batches` (placement
ahead of the step, progress), `cache` (the eval set kept across evaluations), `step` (the eval step
and its accumulators), `evaluator` (ExtendedEvaluation), `transfer` (device-to-host, gathers across
processes), `agreement` (processes agree before any program a failed peer would not run), `result`
(EvalResult), `activity` (tracker work yields to a running evaluation).

May import: the shared top level only (config, errors, imports, logs, kvstore).
Public names: EvalState, ExtendedEvaluation, EvalResult, EvalError, EvalAborted, make_mesh.
"""

from tracker_eval.imports import lazy_exports

_EXPORTS = {
    "EvalState": "state",
    "ExtendedEvaluation": "evaluator",
    "EvalResult": "result",
    "EvalError": "evaluator",
    "EvalAborted": "evaluator",
    "make_mesh": "sharding",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
