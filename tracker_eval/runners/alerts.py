"""Regression alerts: a new checkpoint significantly worse than the best or the previous step.

    watch:
      alerts:
        - {metric: loss, mode: min, against: best, p: 0.01, min_delta: 0.0}

When a result is about to be stored, each rule of its suite compares it with its reference step (the
best earlier stored step by the rule's metric, or the newest earlier one) by the paired test of
`tracker_eval.runners.compare`. An alert is raised when the new step is worse by more than
`min_delta` and p is below the rule's `p`. Alerts are stored inside the result, in the same ledger
transaction, so each (step, rule) raises at most once, and the outbox delivers them with the result,
exactly once to each tracker, across restarts.

    alerts = raise_alerts(config, ledger, result)   # [{"metric": "loss", "step": 500, ..., "message": ...}]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tracker_eval.config import EvalConfig
from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.best import best_of
from tracker_eval.runners.compare import Comparison, compare_results

LOG = logging.getLogger("tracker_eval")


def raise_alerts(config: EvalConfig, ledger: Any, result: EvalResult) -> tuple[dict[str, Any], ...]:
    """The alerts `result` raises under `config.watch.alerts`, read against `ledger` (its suite's)."""
    rules = [(index, rule) for index, rule in enumerate(config.watch.alerts)
             if (rule.suite if rule.suite is not None else config.suite_list()[0].name) == result.suite]
    if not rules:
        return ()
    stored = [(row["step"], row["metrics"]) for row in ledger.rows()
              if row["state"] in ("evaluated", "delivered") and row["step"] < result.step]
    alerts = []
    for index, rule in rules:
        reference = _reference(stored, against=rule.against, metric=rule.metric, mode=rule.mode)
        if reference is None:
            continue
        earlier = ledger.result(reference)
        try:
            found = {c.metric: c for c in compare_results(earlier, result, suite=result.suite)} if earlier else {}
        except ConfigError as error:  # the example sets differ: no paired test, say so once
            LOG.warning("tracker-eval: alert rule %d cannot compare step %d with %d: %s", index, result.step,
                        reference, error)
            continue
        comparison = found.get(rule.metric)
        if comparison is not None and comparison.worse(mode=rule.mode, p=rule.p, min_delta=rule.min_delta):
            alerts.append(alert_record(comparison, rule=index, against=rule.against, p=rule.p, mode=rule.mode))
    return tuple(alerts)


def _reference(stored: list[tuple[int, Mapping[str, float]]], *, against: str, metric: str,
               mode: str) -> int | None:
    if against == "previous":
        having = [step for step, metrics in stored if metric in metrics]
        return max(having) if having else None
    best = best_of(stored, metric=metric, mode=mode)  # by the stored scalar, as `watch.best` ranks
    return None if best is None else best[0]


def alert_record(c: Comparison, *, rule: int, against: str, p: float, mode: str) -> dict[str, Any]:
    """The alert as JSON: both steps, the difference with its interval, p, and a one-line message."""
    t = c.test
    where = f"{c.suite}/" if c.suite else ""
    message = (f"step {c.step_b} is worse than step {c.step_a} ({against}) on {where}{c.metric}: "
               f"{t.mean_b:.6g} vs {t.mean_a:.6g}, diff {t.diff:+.4g} (95% CI [{t.low:+.4g}, {t.high:+.4g}]), "
               f"p={c.p:.3g} < {p}")
    return {"rule": rule, "suite": c.suite, "metric": c.metric, "mode": mode, "against": against,
            "step": c.step_b, "reference_step": c.step_a, "value": t.mean_b, "reference_value": t.mean_a,
            "diff": t.diff, "low": t.low, "high": t.high, "p": c.p,
            "test": "mcnemar" if c.mcnemar is not None else "paired_t", "threshold": p, "message": message}
