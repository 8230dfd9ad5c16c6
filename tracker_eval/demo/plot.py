"""A PNG of eval metrics against checkpoint step, for people who want a look without a tracker UI.

    plot_metrics(status_doc["steps"], "runs/demo/eval_metrics.png", best_step=120)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any


def plot_metrics(
    steps: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str = "", best_step: int | None = None
) -> str:
    """Draws one panel per scalar metric (value against step) and saves a PNG; returns the path."""
    import matplotlib  # noqa: PLC0415 - plotting is optional and heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = sorted((s for s in steps if s.get("metrics")), key=lambda s: s["step"])
    names = sorted({k for s in rows for k in s["metrics"]})
    cols = max(1, min(3, len(names)))
    lines = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.2 * lines), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        points = [(s["step"], s["metrics"][name]) for s in rows if s["metrics"].get(name) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linewidth=1.5)
        if best_step is not None:
            ax.axvline(best_step, color="tab:green", linestyle="--", linewidth=1, label=f"best step {best_step}")
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
