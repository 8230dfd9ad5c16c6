"""`tracker-eval eval`: evaluate one checkpoint once, print it, write it, deliver it.

Unlike the watcher it keeps no ledger: the checkpoint is chosen from the listing (`--step`, else
the newest finalized one), every process of a multi-process job restores and evaluates it, and
process 0 prints the table, writes `--output` and delivers to the configured loggers.

    run_eval("eval.yaml", overrides=[], step=None, suites=None, output="result.json")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tracker_eval.errors import UsageError, one_line

LOG = logging.getLogger("tracker_eval")


def run_eval(config_path: str, *, overrides: Sequence[str], step: int | None, suites: Sequence[str] | None,
             output: str | None) -> int:
    """`tracker-eval eval`: one checkpoint (`step`, else the newest finalized one), a table, optional
    JSON at `output`, fan-out to the loggers; exit code 1 when an evaluation failed."""
    from tracker_eval.config import load_config  # noqa: PLC0415

    config = load_config(config_path, overrides=overrides)
    import jax  # noqa: PLC0415

    from tracker_eval.evaluation.activity import no_more_evaluations  # noqa: PLC0415
    from tracker_eval.runners import distributed  # noqa: PLC0415
    from tracker_eval.runners.pipeline import Components, Pipeline  # noqa: PLC0415

    chosen = _chosen_suites(config, suites)
    components = Components.resolve(config)  # a typo fails now, not after waiting for peers
    distributed.initialize(config.distributed)
    from tracker_eval.checkpoints.remote import bound_storage_waits  # noqa: PLC0415
    from tracker_eval.loggers.session import LoggerSession  # noqa: PLC0415

    bound_storage_waits(config.checkpoint_dir)  # a dead bucket fails in seconds, not after minutes of retries
    session = LoggerSession.open(config) if distributed.is_primary() else None
    try:
        if distributed.is_primary():
            listed = _listed_steps(config)
            steps = listed.steps
            if listed.notice and steps:  # without steps the error below is this line
                print(f"tracker-eval: warning: {listed.notice}", file=sys.stderr)
            if step is None:
                if not steps:
                    raise UsageError(listed.notice or (
                        f"no finalized checkpoint in checkpoint_dir={config.checkpoint_dir!r}; "
                        "point it at an Orbax CheckpointManager directory"
                    ))
                step = steps[-1]
            elif step not in steps:
                raise UsageError(
                    f"--step {step} is not a finalized checkpoint in {config.checkpoint_dir!r}; "
                    f"finalized steps: {_short(steps)}"
                )
        step = distributed.broadcast_from_primary(step if step is not None else -1)
        pipeline = Pipeline(config, components=components, suites=chosen)
        if config.has_suites:
            return _eval_suites(pipeline, step, session=session, output=output)
        result = pipeline.evaluate_step(step)
        no_more_evaluations()  # loggers need not wait for an evaluation that will not come
        if session is None:
            # Every process finalizes the same reduced metrics; saying so in each process's log lets
            # a job's operator see that the processes agree.
            LOG.info("tracker-eval: process %d: step %d reduced metrics %s", jax.process_index(), step,
                     json.dumps(result.to_json()["metrics"], sort_keys=True))
            return 0
        if not session.has_console:
            session.print_table(result)
        if output:
            _write_json(output, result.to_json(per_example_lists=True))
        for error in session.deliver(result).values():  # each names its logger and operation
            print(f"tracker-eval: warning: {one_line(error)}", file=sys.stderr)
        return 0
    finally:
        if session is not None:
            session.close()


def _listed_steps(config: Any) -> Any:
    """The root's survey (finalized steps, a notice on folders not read); a bucket that does not
    exist is the `checkpoint_dir` mistake it most likely is."""
    from tracker_eval.checkpoints.listing import survey  # noqa: PLC0415
    from tracker_eval.checkpoints.roots import configured_names  # noqa: PLC0415
    from tracker_eval.checkpoints.tree import StorageLocationMissingError  # noqa: PLC0415

    try:
        return survey(config.checkpoint_dir, step_names=configured_names(config.checkpoint))
    except StorageLocationMissingError as error:
        raise UsageError(str(error)) from None


def _chosen_suites(config: Any, chosen: Sequence[str] | None) -> list[str] | None:
    """The suites `--suite` names (None: all), checked against the config."""
    if not chosen:
        return None
    names = [suite.name for suite in config.suites]
    if not names:
        raise UsageError("--suite needs a config with suites; this config has one evaluation and no suites")
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise UsageError(f"--suite {unknown[0]!r} is not a suite of this config; suites: {', '.join(names)}")
    return list(dict.fromkeys(chosen))


def _eval_suites(pipeline: Any, step: int, *, session: Any, output: str | None) -> int:
    """Restores `step` once and evaluates each suite; exit code 1 when any suite failed."""
    import jax  # noqa: PLC0415

    from tracker_eval.evaluation.activity import no_more_evaluations  # noqa: PLC0415

    outcomes = pipeline.evaluate_suites(step)
    no_more_evaluations()
    failed = {name: error for name, error in outcomes.items() if isinstance(error, Exception)}
    results = [result for result in outcomes.values() if not isinstance(result, Exception)]
    for name, error in failed.items():
        print(f"tracker-eval: suite {name!r} failed: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
    if session is not None:
        from tracker_eval.runners.stream import suite_versions  # noqa: PLC0415

        versions = suite_versions(pipeline.config)  # keyed as the watcher keys them (tracker_eval.identity)
        results = [dataclasses.replace(r, suite_version=versions.get(r.suite, 1)) for r in results]
    if session is None:
        for result in results:
            LOG.info("tracker-eval: process %d: step %d suite %r reduced metrics %s", jax.process_index(), step,
                     result.suite, json.dumps(result.to_json()["metrics"], sort_keys=True))
        return 1 if failed else 0
    for result in results:
        if not session.has_console:
            session.print_table(result)
        for error in session.deliver(result).values():
            print(f"tracker-eval: warning: {one_line(error)}", file=sys.stderr)
    if output:
        metrics = {f"{result.suite}/{name}": value for result in results
                   for name, value in result.to_json(per_example_lists=True)["metrics"].items()}
        _write_json(output, {"step": step, "checkpoint": pipeline.checkpoint_path(step), "metrics": metrics})
    return 1 if failed else 0


def _write_json(path: str, payload: dict[str, Any]) -> None:
    out = {k: payload[k] for k in ("step", "checkpoint", "metrics")}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2, allow_nan=False)  # strict JSON: non-finite values are null
        f.write("\n")
    os.replace(tmp, path)


def _short(steps: Sequence[int]) -> str:
    return str(list(steps)) if len(steps) <= 10 else f"{list(steps[:5])} ... {list(steps[-5:])} ({len(steps)} in all)"
