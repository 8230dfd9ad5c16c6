"""Paired statistics of one metric at two checkpoints over the same examples.

Each checkpoint is evaluated on the same examples, so the per-example differences `b_i - a_i` carry
the comparison: the noise that every example shares (an easy or a hard example) cancels out, and a
paired test sees a real change that two separate means with their own standard errors would hide.

    test = paired_t(a, b)        # a, b: per-example values at steps A and B, paired by example
    test.diff, test.stderr, test.low, test.high, test.p
    mcnemar(a, b)                # None unless every value is 0 or 1; else the discordant counts and p
    standard_error(values)       # the `<metric>_stderr` beside each mean

Definitions (those of `scipy.stats.ttest_rel` and `scipy.stats.binomtest`, which the tests compare
against): the standard error is the sample standard deviation (ddof=1) over sqrt(n); the interval is
diff ± t(0.975, n-1) · stderr; p is two-sided. Where every difference is zero, t is 0/0 and p is
NaN (undefined, as in scipy: nothing varies, so there is nothing to test); a NaN p is never
significant. McNemar's exact test is the two-sided binomial test of the discordant pairs against
1/2; with no discordant pair at all its p is 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """The paired t-test of `b - a`, example by example.

    Attributes:
      n: examples.
      mean_a: the mean at A.
      mean_b: the mean at B.
      diff: mean(b_i - a_i) (= mean_b - mean_a up to rounding).
      stderr: standard error of `diff` (ddof=1).
      low: lower end of the 95% Student-t interval of `diff`.
      high: upper end of it.
      t: diff / stderr (NaN when every difference is zero).
      p: two-sided p-value (NaN when every difference is zero).
    """

    n: int
    mean_a: float
    mean_b: float
    diff: float
    stderr: float
    low: float
    high: float
    t: float
    p: float

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON numbers; NaN becomes None."""
        return {field.name: _json(getattr(self, field.name)) for field in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two 0/1 metrics over the same examples.

    Attributes:
      only_a: examples with 1 at A and 0 at B (B lost them).
      only_b: examples with 0 at A and 1 at B (B gained them).
      p: two-sided exact binomial p-value of `only_b` out of `only_a + only_b` against 1/2.
    """

    only_a: int
    only_b: int
    p: float

    def to_json(self) -> dict[str, Any]:
        return {"only_a": self.only_a, "only_b": self.only_b, "p": _json(self.p)}


def standard_error(values: Any) -> float:
    """std(values, ddof=1) / sqrt(n) in float64; NaN with fewer than two values."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size < 2:
        return math.nan
    return float(np.std(array, ddof=1) / math.sqrt(array.size))


def paired_t(a: Any, b: Any) -> PairedTest:
    """The paired t-test of `b - a` with its 95% interval.

    Args:
      a: per-example values at A, 1-D.
      b: per-example values at B, the same examples in the same order.

    Raises:
      ValueError: the arrays differ in length, or hold fewer than two examples.
    """
    from scipy import special  # noqa: PLC0415 - scipy loads in ~0.2 s; only comparisons need it

    first, second = _paired_arrays(a, b)
    n = first.size
    diffs = second - first
    diff = float(np.mean(diffs))
    stderr = float(np.std(diffs, ddof=1) / math.sqrt(n))
    df = n - 1
    margin = float(special.stdtrit(df, 0.5 + CONFIDENCE / 2)) * stderr
    with np.errstate(divide="ignore", invalid="ignore"):
        t = float(np.divide(diff, stderr))
    p = math.nan if math.isnan(t) else float(2.0 * special.stdtr(df, -abs(t)))
    return PairedTest(n=n, mean_a=float(np.mean(first)), mean_b=float(np.mean(second)), diff=diff, stderr=stderr,
                      low=diff - margin, high=diff + margin, t=t, p=p)


def is_binary(values: Any) -> bool:
    """Whether every value is 0 or 1 (accuracy, exact match per example)."""
    array = np.asarray(values)
    if array.dtype == np.bool_:
        return True
    return bool(np.all((array == 0) | (array == 1)))


def mcnemar(a: Any, b: Any) -> McNemar | None:
    """McNemar's exact test, or None when a value at either step is not 0 or 1.

    Raises:
      ValueError: the arrays differ in length, or hold fewer than two examples.
    """
    from scipy import special  # noqa: PLC0415

    first, second = _paired_arrays(a, b)
    if not (is_binary(first) and is_binary(second)):
        return None
    only_a = int(np.sum((first == 1) & (second == 0)))
    only_b = int(np.sum((first == 0) & (second == 1)))
    total = only_a + only_b
    if total == 0 or only_a == only_b:
        return McNemar(only_a=only_a, only_b=only_b, p=1.0)
    # Binomial(total, 1/2) is symmetric: the two-sided p doubles the smaller tail.
    p = min(1.0, 2.0 * float(special.bdtr(min(only_a, only_b), total, 0.5)))
    return McNemar(only_a=only_a, only_b=only_b, p=p)


def _paired_arrays(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    first = np.asarray(a, dtype=np.float64).reshape(-1)
    second = np.asarray(b, dtype=np.float64).reshape(-1)
    if first.size != second.size:
        raise ValueError(f"paired values differ in length: {first.size} at A, {second.size} at B")
    if first.size < 2:
        raise ValueError(f"a paired test needs at least two examples; got {first.size}")
    return first, second


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


PER_EXAMPLE_PREFIX = "example_"


def backing_values(metrics: Any, per_example: Any) -> dict[str, np.ndarray]:
    """Mean metric name -> its per-example values: the array ``example_<metric>`` of one value per
    example whose float64 mean equals the metric (within float32 accumulation, 1e-4 relative).

    A weighted mean (a token-weighted loss beside per-sequence losses) does not equal the plain mean
    of the rows, so it gets no values here: a standard error of other numbers would mislead.
    """
    found: dict[str, np.ndarray] = {}
    for name, values in per_example.items():
        if not name.startswith(PER_EXAMPLE_PREFIX):
            continue
        metric = name[len(PER_EXAMPLE_PREFIX):]
        array = np.asarray(values)
        if metric not in metrics or array.ndim != 1 or array.size < 2 or array.dtype.kind not in "biuf":
            continue
        mean = float(np.mean(array, dtype=np.float64))
        stored = float(metrics[metric])
        if math.isfinite(mean) and abs(mean - stored) <= 1e-4 * max(1.0, abs(stored)):
            found[metric] = array
    return found


def with_stderr(metrics: Any, per_example: Any) -> dict[str, Any]:
    """`metrics` with ``<metric>_stderr`` beside each mean that has per-example values (lm-eval's naming).

    A stderr the metrics already have (the harness's own, a user's) is kept as it is.
    """
    backed = backing_values(metrics, per_example)
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        out[name] = value
        if name in backed and f"{name}_stderr" not in metrics:
            out[f"{name}_stderr"] = standard_error(backed[name])  # beside its mean, as lm-eval lists them
    return out
