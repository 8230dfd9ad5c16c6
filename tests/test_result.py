"""EvalResult as strict JSON: what `eval --output`, the JSONL logger and the ledger write."""

from __future__ import annotations

import json
import math

import numpy as np

from tracker_eval.evaluation.result import EvalResult


def test_non_finite_values_become_null_and_scalars_come_back_as_nan():
    result = EvalResult(
        step=7, checkpoint="/ckpt/7", metrics={"loss": math.nan, "acc": 0.5, "count": np.int64(3)},
        per_example={"example_loss": np.array([0.25, np.nan, -np.inf]), "label": np.array([1, 2, 3])},
    )
    text = json.dumps(result.to_json(per_example_lists=True), allow_nan=False)  # raises on NaN/Infinity
    assert json.loads(text)["metrics"] == {
        "loss": None, "acc": 0.5, "count": 3, "example_loss": [0.25, None, None], "label": [1, 2, 3],
    }
    back = EvalResult.from_json(json.loads(json.dumps(result.to_json(), allow_nan=False)))
    assert math.isnan(back.metrics["loss"]) and back.metrics["acc"] == 0.5 and back.step == 7
