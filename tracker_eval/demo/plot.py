"""A PNG of eval metrics against checkpoint step, for people who want a look without a tracker UI.

    plot_metrics(status_doc["steps"], "runs/demo/eval_metrics.png", best_step=120)

A metric with a ``<metric>_stderr`` beside it is drawn with its 95% interval (mean ± 1.96 stderr,
the normal approximation, which the t interval exceeds by 3% at n=40 and 0.4% at n=400), so a
reader sees at a glance which moves are inside the noise; the stderr gets no panel of its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
STDERR_SUFFIX = "_stderr"


def intervals(steps: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float, float | None]]]:
    """Metric -> [(step, value, half width of its 95% interval or None)], by step, one entry per
    metric to draw (stderr metrics are folded into their mean's)."""
    rows = sorted((s for s in steps if s.get("metrics")), key=lambda s: s["step"])
    names = sorted({k for s in rows for k in s["metrics"]})
    drawn = [name for name in names if not (name.endswith(STDERR_SUFFIX) and name[: -len(STDERR_SUFFIX)] in names)]
    out: dict[str, list[tuple[int, float, float | None]]] = {}
    for name in drawn:
        points = []
        for s in rows:
            value, stderr = s["metrics"].get(name), s["metrics"].get(name + STDERR_SUFFIX)
            if value is None:
                continue
            half = None if stderr is None or not math.isfinite(float(stderr)) else Z95 * float(stderr)
            points.append((int(s["step"]), float(value), half))
        out[name] = points
    return out


def plot_metrics(
    steps: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str = "", best_step: int | None = None
) -> str:
    """Draws one panel per scalar metric (value against step, with its 95% interval where it has a
    stderr) and saves a PNG; returns the path."""
    import matplotlib  # noqa: PLC0415 - plotting is optional and heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    series = intervals(steps)
    names = list(series)
    cols = max(1, min(3, len(names)))
    lines = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.2 * lines), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        points = series[name]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", linewidth=1.5)
        if any(p[2] is not None for p in points):
            halves = [p[2] if p[2] is not None else 0.0 for p in points]
            ax.errorbar(xs, ys, yerr=halves, fmt="none", ecolor="tab:blue", alpha=0.6, capsize=3)
            ax.fill_between(xs, [y - h for y, h in zip(ys, halves, strict=True)],
                            [y + h for y, h in zip(ys, halves, strict=True)], alpha=0.15, label="95% interval")
        if best_step is not None:
            ax.axvline(best_step, color="tab:green", linestyle="--", linewidth=1, label=f"best step {best_step}")
        if best_step is not None or any(p[2] is not None for p in points):
            ax.legend(fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
