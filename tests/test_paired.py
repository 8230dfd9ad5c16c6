"""The paired statistics against an independent float64 reference: `scipy.stats.ttest_rel` and
`scipy.stats.binomtest` on the same values, within 1e-9 relative."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tracker_eval.paired import backing_values, mcnemar, paired_t, standard_error, with_stderr

REL = 1e-9


def close(got: float, want: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return got == pytest.approx(want, rel=REL, abs=0 if want else 1e-300)


def reference_t(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    test = stats.ttest_rel(b, a)  # b - a
    interval = test.confidence_interval(0.95)
    diffs = b - a
    return {"diff": float(np.mean(diffs)), "stderr": float(stats.sem(diffs)), "low": float(interval.low),
            "high": float(interval.high), "t": float(test.statistic), "p": float(test.pvalue),
            "mean_a": float(np.mean(a)), "mean_b": float(np.mean(b))}


CASES = {
    "normal": lambda rng: (rng.normal(1.0, 0.3, 397), rng.normal(0.98, 0.3, 397)),
    "float32 losses": lambda rng: (rng.gamma(2.0, 0.2, 64).astype(np.float32),
                                   rng.gamma(2.1, 0.2, 64).astype(np.float32)),
    "tiny p": lambda rng: (rng.normal(0, 1, 500), rng.normal(0, 1, 500) * 0.01 + 2.0),
    "two examples": lambda rng: (np.array([0.3, 0.9]), np.array([0.2, 0.5])),
    "accuracy": lambda rng: (rng.random(300) < 0.6, rng.random(300) < 0.7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_paired_t_equals_scipy(case):
    a, b = CASES[case](np.random.default_rng(len(case)))
    got = paired_t(a, b)
    want = reference_t(np.asarray(a), np.asarray(b))
    assert got.n == len(a)
    for name, value in want.items():
        assert close(getattr(got, name), value), (name, getattr(got, name), value)


def test_all_differences_zero_is_no_evidence_like_scipy():
    values = np.array([0.5, 1.25, 2.0, 0.0])
    got = paired_t(values, values.copy())
    want = reference_t(values, values.copy())
    assert math.isnan(want["p"]) and math.isnan(got.p) and math.isnan(got.t)
    assert (got.diff, got.stderr, got.low, got.high) == (0.0, 0.0, want["low"], want["high"]) == (0, 0, 0, 0)
    assert got.to_json()["p"] is None
    assert mcnemar(np.ones(5), np.ones(5)).p == 1.0  # no discordant pair: nothing against 1/2


def test_constant_nonzero_difference_is_certain_like_scipy():
    a = np.array([1.0, 2.0, 3.0])
    got, want = paired_t(a, a + 0.5), reference_t(a, a + 0.5)
    assert got.p == want["p"] == 0.0 and got.t == want["t"] == math.inf


@pytest.mark.parametrize("only_a, only_b, agree", [(3, 10, 50), (7, 7, 5), (0, 4, 20), (40, 25, 300), (1, 0, 2),
                                                   (160, 220, 1000)])
def test_mcnemar_equals_exact_binomial(only_a, only_b, agree):
    rng = np.random.default_rng(only_a * 1000 + only_b)
    ones = rng.random(agree) < 0.5
    a = np.concatenate([np.ones(only_a), np.zeros(only_b), ones]).astype(np.float32)
    b = np.concatenate([np.zeros(only_a), np.ones(only_b), ones]).astype(np.float32)
    order = rng.permutation(a.size)
    got = mcnemar(a[order], b[order])
    assert (got.only_a, got.only_b) == (only_a, only_b)
    assert close(got.p, stats.binomtest(only_b, only_a + only_b, 0.5).pvalue)


def test_mcnemar_only_for_zero_one_values_and_paired_lengths():
    assert mcnemar(np.array([0.0, 1.0, 0.5]), np.array([1.0, 1.0, 0.0])) is None
    with pytest.raises(ValueError, match="3 at A, 2 at B"):
        paired_t(np.zeros(3), np.zeros(2))


def test_stderr_sits_beside_each_mean_with_per_example_values():
    rng = np.random.default_rng(3)
    losses = rng.gamma(2.0, 0.3, 397).astype(np.float32)
    correct = (rng.random(397) < 0.8).astype(np.float32)
    weighted = float(np.average(losses, weights=rng.random(397) + 0.5))  # a token-weighted mean, say
    metrics = {"loss": float(losses.astype(np.float64).mean()), "accuracy": float(correct.mean()),
               "wloss": weighted, "max_loss": float(losses.max())}
    per_example = {"example_loss": losses, "example_accuracy": correct, "example_wloss": losses}
    out = with_stderr(metrics, per_example)
    assert list(out) == ["loss", "loss_stderr", "accuracy", "accuracy_stderr", "wloss", "max_loss"]
    assert close(out["loss_stderr"], float(stats.sem(losses.astype(np.float64))))
    assert close(out["accuracy_stderr"], float(stats.sem(correct.astype(np.float64))))
    assert set(backing_values(metrics, per_example)) == {"loss", "accuracy"}
    assert with_stderr({"acc": 0.5, "acc_stderr": 0.1}, {"example_acc": np.array([0.0, 1.0])})["acc_stderr"] == 0.1
    assert math.isnan(standard_error([1.0]))
