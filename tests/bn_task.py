"""A model with BatchNorm statistics (`ckpt_factory.MLP`) as a user would name it in a config."""

from __future__ import annotations

import numpy as np
from ckpt_factory import MLP

from tracker_eval.metrics import Mean, PerExample
from tracker_eval.tasks.batching import process_batches

FEATURES = (64, 32, 16)
IN_FEATURES = 24
EXAMPLES = 100


def make_model() -> MLP:
    return MLP(features=FEATURES)


def eval_function(params, apply_fn, batch, rng):
    del rng
    out = apply_fn({"params": params}, batch["x"])
    return {"out_mean": Mean(out.mean(-1)), "row_sum": PerExample(out.sum(-1))}, None


def inputs() -> np.ndarray:
    return np.random.RandomState(1).normal(size=(EXAMPLES, IN_FEATURES)).astype(np.float32)


def make_eval_data(*, split, batch_size, process_index=0, process_count=1):
    del split
    return process_batches({"x": inputs()}, batch_size=batch_size, process_index=process_index,
                           process_count=process_count)


def reference_outputs(params, batch_stats, eps: float = 1e-5) -> np.ndarray:
    """float64 numpy forward pass in inference mode (running mean/var)."""
    x = inputs().astype(np.float64)
    for i in range(len(FEATURES) - 1):
        dense, norm, stats = params[f"Dense_{i}"], params[f"BatchNorm_{i}"], batch_stats[f"BatchNorm_{i}"]
        x = x @ np.float64(dense["kernel"]) + np.float64(dense["bias"])
        x = (x - stats["mean"]) / np.sqrt(np.float64(stats["var"]) + eps) * norm["scale"] + norm["bias"]
        x = np.maximum(x, 0.0)
    head = params[f"Dense_{len(FEATURES) - 1}"]
    return x @ np.float64(head["kernel"]) + np.float64(head["bias"])
