"""`tracker-eval compare`: which of two checkpoints is really better, from the ledger's paired values.

    tracker-eval compare --config watch.yaml 3000 4000 [--suite val ...] [--json]

For each metric with per-example values at both steps (`tracker_eval.runners.pairing`): the means,
the paired difference B - A with its standard error and 95% Student-t interval, the paired t-test's
two-sided p, and for 0/1 values McNemar's exact test (`tracker_eval.paired`). Only the two steps'
rows and files are read, so the cost does not grow with the run's length.

A decision (`worse`) reads McNemar's p for 0/1 metrics (exact, and the standard test for paired
accuracies) and the t-test's p otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from tracker_eval.config import EvalConfig, load_config
from tracker_eval.config.ledger import ledger_error, resolve_ledger_url
from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.identity import run_hash, suite_hash
from tracker_eval.paired import McNemar, PairedTest, mcnemar, paired_t
from tracker_eval.runners.pairing import paired_values


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One metric of one suite at steps A and B (differences are B - A)."""

    suite: str
    metric: str
    step_a: int
    step_b: int
    test: PairedTest
    mcnemar: McNemar | None

    @property
    def p(self) -> float:
        """The p a decision reads: McNemar's for 0/1 values, the t-test's otherwise."""
        return self.mcnemar.p if self.mcnemar is not None else self.test.p

    def worse(self, *, mode: str, p: float, min_delta: float = 0.0) -> bool:
        """Whether B is worse than A by more than `min_delta` with a p below `p` (NaN p: never)."""
        lost = self.test.diff > min_delta if mode == "min" else self.test.diff < -min_delta
        return bool(lost and self.p < p)

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "metric": self.metric, "step_a": self.step_a, "step_b": self.step_b,
                **self.test.to_json(), "mcnemar": None if self.mcnemar is None else self.mcnemar.to_json()}


def compare_results(a: EvalResult, b: EvalResult, *, suite: str) -> list[Comparison]:
    """Every metric with per-example values at both steps, compared (metrics in name order).

    Raises:
      PairingError: the steps' example sets differ.
    """
    out = []
    for metric, pair in sorted(paired_values(a, b, suite=suite).items()):
        out.append(Comparison(suite=suite, metric=metric, step_a=a.step, step_b=b.step,
                              test=paired_t(pair.a, pair.b), mcnemar=mcnemar(pair.a, pair.b)))
    return out


def stored_results(config: EvalConfig, suite: str, steps: Sequence[int]) -> dict[int, EvalResult]:
    """The stored results of `steps` in `suite`'s stream (read-only).

    Raises:
      ConfigError: no ledger, no such suite, or a step without a stored result (one line each).
    """
    from tracker_eval.ledger.db import LedgerError  # noqa: PLC0415
    from tracker_eval.ledger.view import read_results  # noqa: PLC0415

    names = [entry.name for entry in config.suite_list()]
    if suite not in names:
        raise ConfigError(f"--suite {suite!r} is not a suite of this config; suites: {', '.join(names)}"
                          if config.has_suites else f"--suite {suite!r}: this config has one evaluation and no suites")
    keyed = (suite, suite_hash(config, suite)) if config.has_suites else None
    try:
        found = read_results(config.output_dir, checkpoint_dir=config.checkpoint_dir,
                             url=resolve_ledger_url(config.ledger), stream_hash=run_hash(config),
                             steps=list(steps), suite=keyed)
    except LedgerError as error:
        raise ConfigError(ledger_error(config, error)) from None
    where = f"suite {suite!r}" if suite else "this config's evaluation"
    if found is None:
        raise ConfigError(f"the ledger in output_dir={config.output_dir!r} has no results of {where}; "
                          "run `tracker-eval watch` with this config first")
    missing = [step for step in steps if found.get(step) is None]
    if missing:
        raise ConfigError(f"step {missing[0]} has no stored result of {where} in {config.output_dir!r}; "
                          "`tracker-eval status --config FILE` lists the evaluated steps")
    return {step: result for step, result in found.items() if result is not None}


def run_compare(config_path: str, step_a: int, step_b: int, *, suites: Sequence[str] | None = None,
                as_json: bool = False, overrides: Sequence[str] = ()) -> int:
    """Entry point of `tracker-eval compare`; returns the exit code."""
    config = load_config(config_path, overrides=overrides)
    names = list(dict.fromkeys(suites)) if suites else [entry.name for entry in config.suite_list()]
    comparisons: list[Comparison] = []
    for suite in names:
        results = stored_results(config, suite, [step_a, step_b])
        comparisons += compare_results(results[step_a], results[step_b], suite=suite)
    if as_json:
        print(json.dumps({"step_a": step_a, "step_b": step_b, "metrics": [c.to_json() for c in comparisons]},
                         indent=2))
        return 0
    print(format_comparisons(comparisons, step_a=step_a, step_b=step_b))
    return 0


def format_comparisons(comparisons: Sequence[Comparison], *, step_a: int, step_b: int) -> str:
    """A table: one row per metric; B - A, its stderr, 95% interval, p, and McNemar's counts and p."""
    if not comparisons:
        return f"no metric has per-example values at both steps {step_a} and {step_b}"
    suites = any(c.suite for c in comparisons)
    header = [*(["suite"] if suites else []), "metric", "n", f"step {step_a}", f"step {step_b}", "diff (B-A)",
              "stderr", "95% interval", "p", "mcnemar (A only/B only, p)"]
    rows = [header]
    for c in comparisons:
        t = c.test
        exact = "-" if c.mcnemar is None else f"{c.mcnemar.only_a}/{c.mcnemar.only_b}, p={_fmt(c.mcnemar.p)}"
        rows.append([*([c.suite] if suites else []), c.metric, str(t.n), _fmt(t.mean_a), _fmt(t.mean_b),
                     _fmt(t.diff, signed=True), _fmt(t.stderr), f"[{_fmt(t.low, signed=True)}, "
                     f"{_fmt(t.high, signed=True)}]", _fmt(t.p), exact])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _fmt(value: float, *, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.4g}" if signed else f"{value:.4g}"
