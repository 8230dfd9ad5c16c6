"""tracker-eval: evaluate JAX/Flax Orbax checkpoints as they appear and log results to trackers.

    from tracker_eval import ExtendedEvaluation, EvalState, InTrainingEvaluation
    from tracker_eval.metrics import Mean, Sum, Max, Min, PerExample

The package is cut along the path a result travels; each stage imports only stages below it:

    checkpoints/  which steps are finalized; params-only restore onto the mesh; change notification
    evaluation/   EvalState, metric kinds, the jitted sharded evaluator, host transfers, EvalResult
    ledger/       the durable record: steps, stored results, outbox, leases, best step
    loggers/      the logger protocol, registry, isolating fan-out, built-in loggers
    runners/      pipeline, stream, watcher, in-training evaluation, status, multi-process coordination
    tasks/, demo/ built-in tasks and the demo, on top of everything

The top level holds what every stage shares (`config`, `errors`, `imports`, `logs`, `redact`,
`kvstore`) and the public entry points (this module, `metrics`, `cli`). Importing this package
stays light: nothing heavy (jax, wandb, mlflow) is imported until a name that needs it is used.
"""

from __future__ import annotations

from tracker_eval.imports import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "EvalState": "evaluation.state",
    "ExtendedEvaluation": "evaluation.evaluator",
    "InTrainingEvaluation": "runners.in_training",
    "EvalResult": "evaluation.result",
    "load_config": "config",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY)
