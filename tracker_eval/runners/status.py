"""`tracker-eval status`: what the ledger says about each checkpoint step, and whether a watcher lives.

    tracker-eval status --config watch.yaml            # a table
    tracker-eval status --config watch.yaml --json     # {"steps": [...], "newest_step": N, "lag_steps": K}
    # each step: state, reason, attempts, metrics, deliveries {logger: pending | delivered |
    # undeliverable} and delivery_errors {logger: last error}; storage_error: why checkpoint_dir
    # could not be listed (a bucket missing, its server down), else null
    tracker-eval status --config watch.yaml --health   # exit 0 only with a recent watcher heartbeat
                                                       # (from the ledger alone: no storage read)

With suites, each step row has ``suites: {name: {state, reason, metrics, deliveries}}`` (suites the
run had under an earlier config too) and ``state``, the least advanced of the configured suites';
``policies`` gives each configured suite's cadence (a step its policy skipped is ``skipped`` in that
suite, with the policy in its reason); the table has a column group per suite.

It never writes: the ledger is opened read-only (`tracker_eval.ledger.view`), also on a read-only mount.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from tracker_eval.config import EvalConfig, load_config, policy_text
from tracker_eval.config.ledger import ledger_error, resolve_ledger_url
from tracker_eval.errors import ConfigError, one_line
from tracker_eval.identity import run_hash, stream_hash, suite_hash

_HEALTHY_WITHIN_S = 120.0


def collect_status(config: EvalConfig, *, list_checkpoints: bool = True) -> dict[str, Any]:
    """The status document (the `--json` output).

    Reads the ledger without writing anything under `output_dir` (also on a read-only mount): a
    status with another logger list or `watch.best` than the watcher's changes nothing; the best
    step is reported by the config's `watch.best`, computed from the stored results if need be.

    Args:
      config: the watcher's config.
      list_checkpoints: list `checkpoint_dir` for the newest step and the lag. The health check
        needs only the ledger's heartbeat, so it answers where the storage cannot be read (no
        credentials for a bucket, a bucket server down).

    Returns:
      The document; ``storage_error`` says in one line why the checkpoints could not be listed
      (then ``newest_step`` is None), and is None when they were.
    """
    from tracker_eval.checkpoints.listing import survey  # noqa: PLC0415
    from tracker_eval.checkpoints.roots import configured_names  # noqa: PLC0415
    from tracker_eval.checkpoints.tree import StorageUnavailableError  # noqa: PLC0415
    from tracker_eval.runners.stream import logger_names  # noqa: PLC0415

    logger_names(config)  # a bad logger spec is the same error here as in `watch`
    listed: list[int] = []
    storage_error = notice = None
    if list_checkpoints:
        try:
            surveyed = survey(config.checkpoint_dir, step_names=configured_names(config.checkpoint))
            listed, notice = surveyed.steps, surveyed.notice
        except StorageUnavailableError as error:  # the ledger still answers
            storage_error = one_line(error, limit=300)
    doc = _collect_suites(config, listed) if config.has_suites else _collect_single(config, listed)
    if notice:  # folders that look like checkpoints but are not read: said here as the watcher says it
        doc["notice"] = notice
    return {**doc, "storage_error": storage_error}


def _collect_single(config: EvalConfig, listed: list[int]) -> dict[str, Any]:
    from tracker_eval.ledger.db import LedgerError  # noqa: PLC0415
    from tracker_eval.ledger.view import read_ledger  # noqa: PLC0415

    newest = listed[-1] if listed else None
    best_config = config.watch.best
    try:
        status = read_ledger(config.output_dir, checkpoint_dir=config.checkpoint_dir,
                             url=resolve_ledger_url(config.ledger),
                             config_hash=stream_hash(config),
                             best=(best_config.metric, best_config.mode) if best_config else None)
    except LedgerError as error:
        raise ConfigError(ledger_error(config, error)) from None
    if status is None:
        return {"steps": [], "newest_step": newest, "lag_steps": newest, "newest_evaluated_step": None,
                "best": None, "heartbeat": None}
    rows, best, heartbeat = status.rows, status.best, status.heartbeat
    steps = [
        {
            "step": row["step"],
            "state": str(row["state"]),
            "reason": row["reason"],
            "attempts": row["attempts"],
            "metrics": row["metrics"],
            "deliveries": dict(row["deliveries"]),
            "delivery_errors": dict(row["delivery_errors"]),
        }
        for row in rows
    ]
    heartbeat_age_s = None if heartbeat is None else round(time.time() - heartbeat[1], 1)
    stored = [s["step"] for s in steps if s["state"] in ("evaluated", "delivered")]
    done = [s["step"] for s in steps if s["state"] in ("evaluated", "delivered", "skipped", "given_up")]
    lag = None if newest is None else newest - max(done) if done else newest
    return {
        "steps": steps,
        "newest_step": newest,
        "lag_steps": lag,
        "newest_evaluated_step": max(stored) if stored else None,
        "best": None if best is None else {"step": best[0], "value": best[1],
                                           **_uncertainty(config, "", steps, best)},
        "heartbeat": None if heartbeat is None else {"owner": heartbeat[0], "age_s": heartbeat_age_s},
    }


def _uncertainty(
    config: EvalConfig, suite: str, steps: list[dict[str, Any]], best: tuple[int, float]
) -> dict[str, Any]:
    """The best step against the runner-up (`tracker_eval.runners.best`): the fields and the line."""
    from tracker_eval.runners.best import best_verdict  # noqa: PLC0415
    from tracker_eval.runners.compare import stored_results  # noqa: PLC0415

    def result_of(step: int) -> Any:
        try:
            return stored_results(config, suite, [step])[step]
        except ConfigError:
            return None

    best_config = config.watch.best
    stored = [(s["step"], s["metrics"]) for s in steps if s["state"] in ("evaluated", "delivered")]
    verdict = best_verdict(stored, result_of, best=best, metric=best_config.metric, mode=best_config.mode,
                           suite=suite)
    return {**verdict.to_json(), "summary": verdict.line()}


# From least to most advanced: a step's state over its configured suites is the first one any has.
_PROGRESS = ("evaluating", "pending", "failed", "evaluated", "given_up", "skipped", "delivered")


def _collect_suites(config: EvalConfig, listed: list[int]) -> dict[str, Any]:
    from tracker_eval.ledger.db import LedgerError  # noqa: PLC0415
    from tracker_eval.ledger.view import read_run  # noqa: PLC0415

    newest = listed[-1] if listed else None
    names = [suite.name for suite in config.suites]
    best_config = config.watch.best
    best = (config.best_suite(), best_config.metric, best_config.mode) if best_config else None
    try:
        status = read_run(config.output_dir, checkpoint_dir=config.checkpoint_dir,
                          url=resolve_ledger_url(config.ledger), run_hash=run_hash(config),
                          suites={name: suite_hash(config, name) for name in names}, best=best)
    except LedgerError as error:
        raise ConfigError(ledger_error(config, error)) from None
    policies = {name: policy_text(*config.suite_policy(name)) for name in names}
    if status is None:
        return {"steps": [], "suites": names, "policies": policies, "newest_step": newest, "lag_steps": newest,
                "newest_evaluated_step": None, "best": None, "heartbeat": None}
    by_step: dict[int, dict[str, Any]] = {}
    for name, rows in status.suites.items():
        for row in rows:
            by_step.setdefault(row["step"], {})[name] = {
                "state": str(row["state"]), "reason": row["reason"], "attempts": row["attempts"],
                "metrics": row["metrics"], "deliveries": dict(row["deliveries"]),
                "delivery_errors": dict(row["delivery_errors"])}
    steps = []
    for step in sorted(by_step):
        current = [by_step[step].get(name, {"state": "pending"})["state"] for name in names]
        steps.append({"step": step, "state": min(current, key=_PROGRESS.index), "suites": by_step[step]})
    heartbeat = status.heartbeat
    stored = [s["step"] for s in steps if s["state"] in ("evaluated", "delivered")]
    done = [s["step"] for s in steps if s["state"] in ("evaluated", "delivered", "skipped", "given_up")]
    lag = None if newest is None else newest - max(done) if done else newest
    return {
        "steps": steps,
        "suites": list(status.suites),
        "policies": policies,
        "newest_step": newest,
        "lag_steps": lag,
        "newest_evaluated_step": max(stored) if stored else None,
        "best": None if status.best is None else {
            "suite": best[0], "step": status.best[0], "value": status.best[1],
            **_uncertainty(config, best[0], [{"step": s["step"], **s["suites"][best[0]]} for s in steps
                                             if best[0] in s["suites"]], status.best)},
        "heartbeat": None if heartbeat is None else {"owner": heartbeat[0],
                                                     "age_s": round(time.time() - heartbeat[1], 1)},
    }


def run_status(config_path: str, *, overrides: Sequence[str] = (), as_json: bool = False, health: bool = False) -> int:
    """Entry point of `tracker-eval status`; returns the exit code."""
    config = load_config(config_path, overrides=overrides)
    doc = collect_status(config, list_checkpoints=not health)
    if health:
        beat = doc["heartbeat"]
        limit = config.watch.health_stale_s or max(_HEALTHY_WITHIN_S, 3 * config.watch.poll_interval_s)
        healthy = beat is not None and beat["age_s"] <= limit
        print(f"{'healthy' if healthy else 'unhealthy'}: last watcher heartbeat "
              + ("never" if beat is None else f"{beat['age_s']:.0f} s ago"))
        return 0 if healthy else 1
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(format_table(doc, prefix=config.metric_prefix))
    if doc.get("notice"):
        print(f"warning: {doc['notice']}")
    return 0


def format_table(doc: dict[str, Any], *, prefix: str = "eval") -> str:
    """A readable table: step, state, headline metrics, delivery per logger (per suite with suites)."""
    steps = doc["steps"]
    if not steps:
        return f"no evaluations recorded yet; newest checkpoint: {_newest(doc)}"
    if "suites" in doc:
        return _suites_table(doc)
    metric_names = _headline({k for s in steps for k in s["metrics"]}, 4)
    loggers = sorted({k for s in steps for k in s["deliveries"]})
    header = ["step", "state", *metric_names, *loggers]
    lines = [header]
    for s in steps:
        metrics = [_fmt(s["metrics"].get(name)) for name in metric_names]
        deliveries = [s["deliveries"].get(name, "-") for name in loggers]
        explained = s["reason"] and s["state"] in ("failed", "given_up", "skipped")
        state = s["state"] + (f" ({s['reason']})" if explained else "")
        lines.append([str(s["step"]), state[:60], *metrics, *deliveries])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines)
    best = doc.get("best")
    footer = f"\nnewest checkpoint: {_newest(doc)}, lag: {doc['lag_steps']} steps"
    if best:
        footer += "\n" + best.get("summary", f"best: step {best['step']} ({_fmt(best['value'])})")
    stuck = [(s["step"], name, s["delivery_errors"].get(name, ""))
             for s in steps for name, state in sorted(s["deliveries"].items()) if state == "undeliverable"]
    if stuck:
        footer += "\nundeliverable (fix the cause, then `tracker-eval retry --config FILE [--step N] [--logger ID]`):"
        footer += "".join(f"\n  step {step} -> {name}: {reason[:160]}" for step, name, reason in stuck)
    return text + footer


def _suites_table(doc: dict[str, Any]) -> str:
    """One row per step; per suite a column group: state, up to two metrics, deliveries done/all."""
    groups = []
    for name in doc["suites"]:
        rows = [s["suites"][name] for s in doc["steps"] if name in s["suites"]]
        groups.append((name, _headline({k for r in rows for k in r["metrics"]}, 2)))
    header = ["step", *[f"{name}/{col}" for name, metrics in groups for col in ("state", *metrics, "delivered")]]
    lines = [header]
    for s in doc["steps"]:
        cells = [str(s["step"])]
        for name, metrics in groups:
            entry = s["suites"].get(name)
            if entry is None:
                cells += ["-"] * (2 + len(metrics))
                continue
            explained = entry["reason"] and entry["state"] in ("failed", "given_up", "skipped")
            cells.append((entry["state"] + (f" ({entry['reason']})" if explained else ""))[:40])
            cells += [_fmt(entry["metrics"].get(metric)) for metric in metrics]
            done = sum(state == "delivered" for state in entry["deliveries"].values())
            cells.append(f"{done}/{len(entry['deliveries'])}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines)
    best = doc.get("best")
    footer = f"\nnewest checkpoint: {_newest(doc)}, lag: {doc['lag_steps']} steps"
    if best:
        footer += f"\n{best['suite']}: {best['summary']}"
    footer += "\npolicies: " + ", ".join(f"{name}: {text}" for name, text in doc.get("policies", {}).items())
    return text + footer


def _newest(doc: dict[str, Any]) -> str:
    """The newest checkpoint, or why it is not known (a bucket missing, its server down)."""
    error = doc.get("storage_error")
    return f"unknown ({error})" if error else str(doc["newest_step"])


def _headline(names: set[str], count: int) -> list[str]:
    """The first `count` metric names, means before their ``_stderr`` (which `--json` has in full)."""
    means = sorted(name for name in names if not (name.endswith("_stderr") and name[:-7] in names))
    return (means + sorted(set(names) - set(means)))[:count]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


__all__ = ["ConfigError", "collect_status", "format_table", "run_status"]
