"""Metric kinds: masking, extremes of negative values, compensated sums and exact large counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracker_eval.evaluation import metrics as m


def _accumulate(metric_cls, batches, masks, **kwargs):
    first = metric_cls(jnp.asarray(batches[0]), **kwargs)
    state = jax.tree.map(jnp.asarray, m.init_state(first))
    update = jax.jit(lambda s, v, mk: m.update_state(s, metric_cls(v, **kwargs), mk))
    for values, mask in zip(batches, masks, strict=True):
        state = update(state, jnp.asarray(values), jnp.asarray(mask))
    return m.host_state({"x": jax.device_get(state)})["x"]


def test_max_min_of_all_negative_values_ignore_padding():
    rs = np.random.RandomState(1)
    batches = [-(rs.rand(8).astype(np.float32) + 1.0) for _ in range(3)]
    masks = [np.ones(8, bool), np.ones(8, bool), np.arange(8) < 3]
    batches[2][3:] = 100.0  # padding rows hold junk that must not win
    real = np.concatenate([b[mk] for b, mk in zip(batches, masks, strict=True)]).astype(np.float64)
    assert m.finalize_value("Max", _accumulate(m.Max, batches, masks)) == pytest.approx(real.max(), rel=1e-7)
    assert m.finalize_value("Min", _accumulate(m.Min, batches, masks)) == pytest.approx(real.min(), rel=1e-7)


def test_nan_in_padding_rows_does_not_leak():
    values = [np.array([1.0, 2.0, np.nan, np.inf], np.float32)]
    masks = [np.array([True, True, False, False])]
    state = _accumulate(m.Mean, values, masks)
    assert m.finalize_value("Mean", state) == pytest.approx(1.5)


def test_weighted_mean_matches_float64_reference():
    rs = np.random.RandomState(2)
    vals = [rs.randn(6, 5).astype(np.float32) for _ in range(4)]
    weights = [(rs.rand(6, 5) > 0.3).astype(np.float32) for _ in range(4)]
    masks = [np.ones(6, bool)] * 3 + [np.arange(6) < 4]
    first = m.Mean(jnp.asarray(vals[0]), weights=jnp.asarray(weights[0]))
    state = jax.tree.map(jnp.asarray, m.init_state(first))
    update = jax.jit(lambda s, v, w, mk: m.update_state(s, m.Mean(v, weights=w), mk))
    for v, w, mk in zip(vals, weights, masks, strict=True):
        state = update(state, v, w, mk)
    got = m.finalize_value("Mean", m.host_state({"x": jax.device_get(state)})["x"])
    num = sum((v.astype(np.float64) * w)[mk].sum() for v, w, mk in zip(vals, weights, masks, strict=True))
    den = sum(w.astype(np.float64)[mk].sum() for w, mk in zip(weights, masks, strict=True))
    assert got == pytest.approx(num / den, rel=1e-6)


def test_compensated_running_sum_holds_what_a_float32_running_sum_loses():
    # Every batch's own sum is exact in float32 (small integers), so the only error left is the
    # running sum's: one large batch, then a thousand small ones whose sums a float32 running total
    # (spacing 16 at 2^27) rounds away. The reference is exact integer arithmetic.
    rs = np.random.RandomState(4)
    big = np.full(8, 2.0**24, np.float32)
    small = [rs.randint(0, 4, 8).astype(np.float32) for _ in range(1000)]
    batches = [big, *small, np.array([1, 2, 3, 1e30, -1e30, np.nan, 7, 7], np.float32)]
    masks = [np.ones(8, bool)] * (len(batches) - 1) + [np.arange(8) < 3]  # junk in the padding rows
    reference = sum(int(b[mk].astype(np.int64).sum()) for b, mk in zip(batches[:-1], masks[:-1], strict=True)) + 6
    running = np.float32(0)  # what a plain float32 accumulator of the same exact partial sums holds
    for b, mk in zip(batches, masks, strict=True):
        running = np.float32(running + np.float32(b[mk].sum()))
    assert abs(int(running) - reference) > 100, (int(running), reference)  # the data exposes float32

    total = m.finalize_value("Sum", _accumulate(m.Sum, batches, masks))
    assert total == reference
    count = sum(int(mk.sum()) for mk in masks)
    mean = m.finalize_value("Mean", _accumulate(m.Mean, batches, masks))
    assert mean == pytest.approx(reference / count, rel=1e-15)


def test_counts_stay_exact_past_two_to_the_31():
    per_batch = 3_000_000  # exact in float32; 1,000 batches make 3e9 > 2**31
    acc = jnp.zeros((2,), jnp.float32)
    add = jax.jit(lambda a, x: m.two_sum_add(a, x))
    value = jnp.float32(per_batch)
    for _ in range(1000):
        acc = add(acc, value)
    total = m.host_state({"n": {"sum": jax.device_get(acc)}})["n"]["sum"]
    assert total == 3_000_000_000  # past 2^31: neither wrapped nor rounded


def test_non_metric_output_is_a_clear_error():
    with pytest.raises(TypeError, match="'loss'.*Mean, Sum, Max, Min or PerExample"):
        m.check_metrics({"loss": jnp.ones(3)})
