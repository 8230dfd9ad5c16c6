"""The best step with its uncertainty: is it really better than the runner-up?

    verdict = best_verdict(results_by_step_metrics, result_of, metric="loss", mode="min", suite="")
    verdict.line()   # "best: step 4000 (loss 1.231), not distinguishable from step 3000 (p=0.41)"

The runner-up is the best of the other steps by the ledger's rules (`tracker_eval.ledger.best`).
The two are compared by the paired test of `tracker_eval.runners.compare` (McNemar for 0/1 values,
the t-test otherwise); the best is significantly better when that p is below 0.05.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tracker_eval.config import EvalConfig
from tracker_eval.config.ledger import ledger_error, resolve_ledger_url
from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.identity import run_hash, stream_hash, suite_hash
from tracker_eval.ledger.best import best_of
from tracker_eval.runners.compare import Comparison, compare_results

SIGNIFICANCE = 0.05


@dataclasses.dataclass(frozen=True)
class BestVerdict:
    """The best step, the runner-up and the paired test between them (runner-up = A, best = B)."""

    metric: str
    step: int
    value: float
    runner_up: tuple[int, float] | None
    comparison: Comparison | None

    @property
    def significant(self) -> bool:
        """Whether the best beats the runner-up with a paired p below 0.05 (NaN p: no)."""
        return self.comparison is not None and self.comparison.p < SIGNIFICANCE

    def to_json(self) -> dict[str, Any]:
        """The fields `status --json` and ``best.json`` add beside the best step."""
        if self.runner_up is None:
            return {"runner_up": None, "significant": None}
        c = self.comparison
        tested = None if c is None else {"diff": _num(c.test.diff), "low": _num(c.test.low), "high": _num(c.test.high),
                                         "p": _num(c.p), "test": "mcnemar" if c.mcnemar is not None else "paired_t"}
        return {"runner_up": {"step": self.runner_up[0], "value": _num(self.runner_up[1]), **(tested or {})},
                "significant": None if c is None else self.significant}

    def line(self) -> str:
        """``best: step N (metric v), significantly better than / not distinguishable from step M (p=...)``."""
        text = f"best: step {self.step} ({self.metric} {self.value:.4g})"
        if self.runner_up is None:
            return text + ", the only evaluated step"
        if self.comparison is None:
            return text + f", untested against step {self.runner_up[0]} (no per-example values of {self.metric})"
        how = "significantly better than" if self.significant else "not distinguishable from"
        return text + f", {how} step {self.runner_up[0]} (p={self.comparison.p:.2g})"


def best_verdict(
    steps: Iterable[tuple[int, Mapping[str, float]]], result_of: Callable[[int], EvalResult | None], *,
    best: tuple[int, float], metric: str, mode: str, suite: str,
) -> BestVerdict:
    """The verdict on `best` among `steps` ((step, stored metrics) pairs); `result_of` reads a stored
    result, per-example values included (called for the best and the runner-up only)."""
    others = [(step, metrics) for step, metrics in steps if step != best[0]]
    runner_up = best_of(others, metric=metric, mode=mode)
    comparison = None
    if runner_up is not None:
        first, second = result_of(runner_up[0]), result_of(best[0])
        if first is not None and second is not None:
            try:
                found = {c.metric: c for c in compare_results(first, second, suite=suite)}
            except ConfigError:  # example sets differ: no paired verdict
                found = {}
            comparison = found.get(metric)
    return BestVerdict(metric=metric, step=best[0], value=best[1], runner_up=runner_up, comparison=comparison)


def best_step(config: EvalConfig, *, suite: str, metric: str, mode: str) -> int | None:
    """The best stored step of `suite` by `metric` (read-only), or None when no result has it."""
    from tracker_eval.ledger.db import LedgerError  # noqa: PLC0415
    from tracker_eval.ledger.view import read_ledger, read_run  # noqa: PLC0415

    try:
        if config.has_suites:
            status = read_run(config.output_dir, checkpoint_dir=config.checkpoint_dir,
                              url=resolve_ledger_url(config.ledger), run_hash=run_hash(config),
                              suites={s.name: suite_hash(config, s.name) for s in config.suites},
                              best=(suite, metric, mode))
        else:
            status = read_ledger(config.output_dir, checkpoint_dir=config.checkpoint_dir,
                                 url=resolve_ledger_url(config.ledger),
                                 config_hash=stream_hash(config), best=(metric, mode))
    except LedgerError as error:
        raise ConfigError(ledger_error(config, error)) from None
    return None if status is None or status.best is None else status.best[0]


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None
