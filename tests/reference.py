"""Independent float64 numpy references for the digits classifier (no tracker_eval code on the path)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def mlp_losses(params: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example cross-entropy and correctness of the two-layer MLP, in float64."""
    p = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()} for k, layer in params.items()}
    h = np.maximum(x.astype(np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0.0)
    logits = h @ p["out"]["kernel"] + p["out"]["bias"]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(len(y)), y], logits.argmax(-1) == y


def restored_params(checkpoint_dir: str | os.PathLike[str], step: int) -> Any:
    """Params of `step` through a plain Orbax restore of the whole state (not our params-only path)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    with ocp.CheckpointManager(os.fspath(checkpoint_dir)) as manager:
        return manager.restore(step)["params"]


def validation_metrics(params: Any) -> tuple[np.ndarray, float]:
    """(per-example losses, accuracy) on the digits validation split."""
    from tracker_eval.tasks import classification  # noqa: PLC0415 - only for the data

    x, y = classification.split_digits("validation")
    losses, correct = mlp_losses(params, x, y)
    return losses, float(correct.mean())
