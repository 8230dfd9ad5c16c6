"""`tracker-eval retry`: queue undeliverable deliveries again, once their cause is fixed; or ask for
skipped steps.

    tracker-eval retry --config watch.yaml                          # every undeliverable delivery
    tracker-eval retry --config watch.yaml --step 300 --logger mlflow
    tracker-eval retry --config watch.yaml --skipped --step 1500 --suite harness

A delivery is undeliverable when its tracker refused the result (e.g. HTTP 400, a NaN under
``nan_policy: error``) or it failed ``watch.max_delivery_attempts`` times. Re-queuing is one ledger
transaction, so it is safe while a watcher runs: the watcher's delivery threads send the results
at their next look at the outbox; otherwise the next ``watch`` (or ``InTrainingEvaluation``) does.

With ``--skipped``, skipped steps (e.g. by a suite's policy) become pending again, marked as asked
for, so the watcher evaluates them although the policy would skip them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tracker_eval.config import load_config
from tracker_eval.config.ledger import resolve_ledger_url
from tracker_eval.errors import ConfigError


def run_retry(
    config_path: str, *, overrides: Sequence[str] = (), step: int | None = None, logger: str | None = None
) -> int:
    """Entry point of `tracker-eval retry`; returns the exit code.

    Args:
      config_path: the watcher's config (it names the ledger: output_dir, stream, loggers).
      overrides: `key=value` config overrides.
      step: only this step's deliveries.
      logger: only deliveries to this logger (its `id`).

    Raises:
      ConfigError: `logger` is not configured, there is no ledger, or `step` is not in it.
    """
    from tracker_eval.runners.stream import logger_names, open_ledgers  # noqa: PLC0415

    config = load_config(config_path, overrides=overrides)
    names = logger_names(config)
    if logger is not None and logger not in names:
        raise ConfigError(f"--logger {logger!r} is not a configured logger; configured: {', '.join(names) or 'none'}")
    in_file = resolve_ledger_url(config.ledger) is None
    if in_file and not os.path.exists(os.path.join(config.output_dir, "ledger.sqlite")):
        raise ConfigError(f"no ledger in output_dir={config.output_dir!r}: nothing was evaluated there yet; "
                          "check --config (and its output_dir)")
    ledgers = open_ledgers(config, loggers=names)
    try:
        _check_step(config, ledgers, step)
        queued = [(s, name if not suite else f"{name} (suite {suite})") for suite, ledger in ledgers.items()
                  for s, name in ledger.requeue_undeliverable(step=step, logger=logger)]
    finally:
        for ledger in ledgers.values():
            ledger.close()
    scope = "".join([f" of step {step}" if step is not None else "", f" to {logger!r}" if logger else ""])
    if not queued:
        print(f"tracker-eval: nothing to re-queue: no undeliverable delivery{scope}")
        return 0
    listed = ", ".join(f"step {s} -> {name}" for s, name in queued[:20]) + (" ..." if len(queued) > 20 else "")
    print(f"tracker-eval: re-queued {len(queued)} deliver{'y' if len(queued) == 1 else 'ies'}{scope}: {listed}; "
          "a running watcher sends them shortly, otherwise the next `tracker-eval watch` does")
    return 0


def run_ask_for_skipped(
    config_path: str, *, overrides: Sequence[str] = (), step: int | None = None, suite: str | None = None
) -> int:
    """Entry point of `tracker-eval retry --skipped`: skipped steps are pending again, and no policy
    skips them (`tracker_eval.ledger.steps.Ledger.ask_for_skipped`); returns the exit code.

    Raises:
      ConfigError: `suite` is not a suite of the config, there is no ledger, or `step` is not in it.
    """
    from tracker_eval.runners.stream import logger_names, open_ledgers  # noqa: PLC0415

    config = load_config(config_path, overrides=overrides)
    names = [s.name for s in config.suites]
    if suite is not None and suite not in names:
        valid = f"suites: {', '.join(names)}" if names else "this config has no suites; leave --suite out"
        raise ConfigError(f"--suite {suite!r} is not a suite of this config; {valid}")
    in_file = resolve_ledger_url(config.ledger) is None
    if in_file and not os.path.exists(os.path.join(config.output_dir, "ledger.sqlite")):
        raise ConfigError(f"no ledger in output_dir={config.output_dir!r}: nothing was evaluated there yet; "
                          "check --config (and its output_dir)")
    ledgers = open_ledgers(config, loggers=logger_names(config))
    try:
        _check_step(config, ledgers, step)
        asked = [(s, name) for name, ledger in ledgers.items() if suite in (None, name)
                 for s in ledger.ask_for_skipped(step)]
    finally:
        for ledger in ledgers.values():
            ledger.close()
    scope = "".join([f" of step {step}" if step is not None else "", f" in suite {suite!r}" if suite else ""])
    if not asked:
        print(f"tracker-eval: nothing to ask for: no skipped step{scope}")
        return 0
    listed = ", ".join(f"step {s}" + (f" ({name})" if name else "") for s, name in asked[:20])
    print(f"tracker-eval: asked for {len(asked)} skipped step{'' if len(asked) == 1 else 's'}{scope}: "
          f"{listed}{' ...' if len(asked) > 20 else ''}; a running watcher evaluates them shortly, "
          "otherwise the next `tracker-eval watch` does")
    return 0


def _check_step(config: Any, ledgers: dict[str, Any], step: int | None) -> None:
    if step is not None and all(ledger.state(step) is None for ledger in ledgers.values()):
        known = sorted({s for ledger in ledgers.values() for s in ledger.steps()})
        shown = ", ".join(map(str, known[:10])) + (" ..." if len(known) > 10 else "")
        raise ConfigError(f"--step {step} is not in the ledger of {config.output_dir!r}; known steps: "
                          f"{shown or 'none'}")
