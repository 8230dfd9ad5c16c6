"""The demo's plot draws each mean with its 95% interval (mean ± 1.96 stderr) and no stderr panel."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tracker_eval.demo.plot import intervals, plot_metrics

# The harness demo's acc_norm over four checkpoints (values and stderr as README reports them).
STEPS = [{"step": step, "metrics": {"acc_norm": value, "acc_norm_stderr": 0.08, "loss": 1.0 / step}}
         for step, value in ((50, 0.675), (100, 0.65), (150, 0.625), (200, 0.6))]


def test_intervals_are_the_normal_95_percent_band():
    got = intervals(STEPS)
    assert list(got) == ["acc_norm", "loss"]  # acc_norm_stderr is drawn as acc_norm's band, not a panel
    z = stats.norm.ppf(0.975)
    for (step, value, half), row in zip(got["acc_norm"], STEPS, strict=True):
        assert (step, value) == (row["step"], row["metrics"]["acc_norm"])
        assert half == pytest.approx(z * 0.08, rel=1e-12)
    assert all(half is None for _, _, half in got["loss"])
    # The whole fall from 0.675 to 0.600 lies inside one checkpoint's interval: noise, as drawn.
    first, last = got["acc_norm"][0], got["acc_norm"][-1]
    assert first[1] - first[2] < last[1] < first[1] + first[2]


def test_the_band_is_drawn(tmp_path):
    import matplotlib.image as mpimg

    with_band = mpimg.imread(plot_metrics(STEPS, tmp_path / "with.png"))
    without = [{"step": s["step"], "metrics": {k: v for k, v in s["metrics"].items() if not k.endswith("_stderr")}}
               for s in STEPS]
    bare = mpimg.imread(plot_metrics(without, tmp_path / "without.png"))
    assert with_band.shape == bare.shape
    changed = np.any(np.abs(with_band - bare) > 0.05, axis=-1)
    assert changed[:, : changed.shape[1] // 2].mean() > 0.01  # the acc_norm panel (left) gained the band
