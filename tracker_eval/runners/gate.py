"""`tracker-eval gate`: a pipeline's yes or no on one checkpoint against the best or a named step.

    tracker-eval gate --config watch.yaml --step 5000 --against best --metric loss [--suite val] [--p 0.05]

Exit 0 when step N is not significantly worse than the reference step on the metric (a paired test,
`tracker_eval.runners.compare`), 1 when it is, 2 for a usage error; one line says why. The direction
(lower or higher is better) comes from `--mode`, else from `watch.best` or a `watch.alerts` rule of
that metric.
"""

from __future__ import annotations

from collections.abc import Sequence

from tracker_eval.config import EvalConfig, load_config
from tracker_eval.errors import ConfigError
from tracker_eval.runners.compare import Comparison, compare_results, stored_results


def run_gate(config_path: str, *, step: int, against: str, metric: str, suite: str | None = None,
             p: float = 0.05, mode: str | None = None, overrides: Sequence[str] = ()) -> int:
    """Entry point of `tracker-eval gate`; returns the exit code (0 pass, 1 significantly worse)."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"--p {p} is not a probability between 0 and 1; e.g. --p 0.05")
    config = load_config(config_path, overrides=overrides)
    suite = _suite(config, suite)
    mode = _mode(config, metric=metric, suite=suite, mode=mode)
    reference = _reference_step(config, against=against, suite=suite, metric=metric, mode=mode)
    if reference == step:
        print(f"pass: step {step} is the reference step itself ({against}) on {metric}")
        return 0
    results = stored_results(config, suite, [reference, step])
    found = {c.metric: c for c in compare_results(results[reference], results[step], suite=suite)}
    if metric not in found:
        raise ConfigError(f"--metric {metric!r} has no per-example values at steps {reference} and {step}; "
                          f"metrics that have: {', '.join(found) or 'none'}")
    comparison = found[metric]
    worse = comparison.worse(mode=mode, p=p)
    print(("fail: " if worse else "pass: ") + describe(comparison, mode=mode, p=p, worse=worse))
    return 1 if worse else 0


def describe(c: Comparison, *, mode: str, p: float, worse: bool) -> str:
    """One line: both steps, the difference with its interval, p against the threshold."""
    t = c.test
    test = "McNemar" if c.mcnemar is not None else "paired t"
    verdict = "significantly worse than" if worse else "not significantly worse than"
    return (f"step {c.step_b} is {verdict} step {c.step_a} on {c.metric} ({'lower' if mode == 'min' else 'higher'} "
            f"is better): {t.mean_b:.6g} vs {t.mean_a:.6g}, diff {t.diff:+.4g} "
            f"(95% CI [{t.low:+.4g}, {t.high:+.4g}]), {test} p={c.p:.3g} {'<' if c.p < p else '>='} {p}")


def _suite(config: EvalConfig, suite: str | None) -> str:
    if suite is not None:
        return suite
    if not config.has_suites:
        return ""
    if len(config.suites) == 1:
        return config.suites[0].name
    names = ", ".join(entry.name for entry in config.suites)
    raise ConfigError(f"this config has several suites; name one with --suite ({names})")


def _mode(config: EvalConfig, *, metric: str, suite: str, mode: str | None) -> str:
    if mode is not None:
        if mode not in ("min", "max"):
            raise ConfigError(f"--mode {mode!r} is not min or max")
        return mode
    best = config.watch.best
    if best is not None and best.metric == metric and config.best_suite() == suite:
        return best.mode
    for rule in config.watch.alerts:
        if rule.metric == metric and rule.suite in (None, suite):
            return rule.mode
    raise ConfigError(f"which way is better for {metric!r}? add --mode min (lower is better) or --mode max")


def _reference_step(config: EvalConfig, *, against: str, suite: str, metric: str, mode: str) -> int:
    if against != "best":
        try:
            return int(against)
        except ValueError:
            raise ConfigError(f"--against {against!r} is neither 'best' nor a step number") from None
    from tracker_eval.runners.best import best_step  # noqa: PLC0415

    found = best_step(config, suite=suite, metric=metric, mode=mode)
    if found is None:
        where = f" of suite {suite!r}" if suite else ""
        raise ConfigError(f"no stored result{where} has {metric!r}; nothing to gate against")
    return found
