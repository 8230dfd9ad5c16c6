"""tracker-eval: evaluate JAX/Flax Orbax checkpoints as they appear and log results to trackers.

    from tracker_eval import ExtendedEvaluation, EvalState, InTrainingEvaluation
    from tracker_eval.metrics import Mean, Sum, Max, Min, PerExample

Importing this package stays light: nothing heavy (jax, wandb, mlflow) is imported until a name
that needs it is used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "EvalState": "tracker_eval.state",
    "ExtendedEvaluation": "tracker_eval.evaluator",
    "InTrainingEvaluation": "tracker_eval.in_training",
    "EvalResult": "tracker_eval.result",
    "load_config": "tracker_eval.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tracker_eval' has no attribute {name!r}")
