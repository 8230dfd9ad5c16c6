"""The digits classifier with results some trackers can never take: a NaN metric (MLflow with
``nan_policy: error`` refuses it) and per-example metrics named ``file`` and ``allow_pickle`` (the
names that break ``np.savez``). Used by the undeliverable-result watcher test."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from tracker_eval.metrics import PerExample
from tracker_eval.tasks import classification


def eval_function(params: Any, apply_fn: Any, batch: Any, rng: Any) -> tuple[dict[str, Any], None]:
    """The classifier's metrics plus per-example loss and correctness under awkward names."""
    metrics, _ = classification.eval_function(params, apply_fn, batch, rng)
    logits = apply_fn({"params": params}, batch["x"])
    loss = classification.cross_entropy(logits, batch["y"])
    correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    return {**metrics, "file": PerExample(loss), "allow_pickle": PerExample(correct)}, None


def with_nan(metrics: dict[str, float]) -> dict[str, float]:
    """A derived metric that is always NaN (e.g. a ratio over an empty class)."""
    del metrics
    return {"nan_ratio": float("nan")}
