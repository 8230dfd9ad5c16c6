"""The `tracker-eval` command line: eval, watch, status, retry, compare, gate, ledger copy, demo.

    tracker-eval eval --config eval.yaml [--step N] [--suite NAME ...] [--output result.json] [key=value ...]
    tracker-eval watch --config watch.yaml [key=value ...]
    tracker-eval status --config watch.yaml [--json]
    tracker-eval retry --config watch.yaml [--step N] [--logger ID]
    tracker-eval compare --config watch.yaml A B [--suite NAME ...] [--json]
    tracker-eval gate --config watch.yaml --step N --against best|STEP --metric NAME [--suite NAME] [--p 0.05]
    tracker-eval retry --config watch.yaml --skipped [--step N] [--suite NAME]
    tracker-eval ledger copy --config watch.yaml --to postgresql://USER@HOST:PORT/DB
    tracker-eval demo [--harness]

Exit codes: 0 ok, 1 evaluation failure (gate: significantly worse), 2 usage or config error; user errors print one line
(`tracker-eval: error: ...`) and no traceback (`--verbose` shows it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tracker_eval.commands import build_parser
from tracker_eval.errors import ConfigError, one_line
from tracker_eval.logs import configure_logging, quiet_environment

LOG = logging.getLogger("tracker_eval")


class UsageError(ConfigError):
    """A command-line mistake (exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    quiet_environment()
    parser = build_parser()  # tracker_eval.commands
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, so that a reader gone early (`| head`) is seen below, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except ConfigError as error:
        if args.verbose:
            LOG.exception("config error")
        print(f"tracker-eval: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tracker-eval: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence prints one line
        if args.verbose:
            LOG.exception("failed")
        print(f"tracker-eval: failed: {type(error).__name__}: {one_line(error)}"
              + ("" if args.verbose else " (run with --verbose for details)"), file=sys.stderr)
        return 1


def _reader_gone() -> int:
    """`tracker-eval status --json | head`: the reader has what it wanted; end quietly, as `cat` does."""
    # Python would report the unflushed rest of stdout at exit; point stdout at /dev/null instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "watch":
        from tracker_eval.runners.watcher import run_watch  # noqa: PLC0415

        return run_watch(args.config, overrides=args.overrides)
    if args.command == "status":
        from tracker_eval.runners.status import run_status  # noqa: PLC0415

        return run_status(args.config, overrides=args.overrides, as_json=args.json, health=args.health)
    if args.command == "retry":
        from tracker_eval.runners.retry import run_retry  # noqa: PLC0415

        if args.skipped:
            from tracker_eval.runners.retry import run_ask_for_skipped  # noqa: PLC0415

            if args.logger is not None:
                raise UsageError("--logger applies to deliveries, not to --skipped; leave one of them out")
            return run_ask_for_skipped(args.config, overrides=args.overrides, step=args.step, suite=args.suite)
        if args.suite is not None:
            raise UsageError("--suite applies with --skipped; add --skipped or leave --suite out")
        return run_retry(args.config, overrides=args.overrides, step=args.step, logger=args.logger)
    if args.command == "compare":
        from tracker_eval.runners.compare import run_compare  # noqa: PLC0415

        return run_compare(args.config, args.step_a, args.step_b, suites=args.suite, as_json=args.json,
                           overrides=args.overrides)
    if args.command == "gate":
        from tracker_eval.runners.gate import run_gate  # noqa: PLC0415

        return run_gate(args.config, step=args.step, against=args.against, metric=args.metric, suite=args.suite,
                        p=args.p, mode=args.mode, overrides=args.overrides)
    if args.command == "ledger":
        from tracker_eval.runners.ledger_copy import run_ledger_copy  # noqa: PLC0415

        return run_ledger_copy(args.config, to=args.to, overrides=args.overrides)
    if args.command == "demo":
        from tracker_eval.demo.run import run_demo  # noqa: PLC0415

        return run_demo(
            output_dir=args.output_dir or ("runs/demo-harness" if args.harness else "runs/demo"),
            steps=args.steps,
            wandb=not args.no_wandb,
            mlflow=not args.no_mlflow,
            tensorboard=not args.no_tensorboard,
            in_training=args.in_training,
            harness=args.harness,
            limit=args.limit,
        )
    raise UsageError(f"unknown command {args.command!r}")


def cmd_eval(args: argparse.Namespace) -> int:
    """`tracker-eval eval`: one checkpoint, a table, optional JSON, fan-out to the loggers."""
    from tracker_eval.config import load_config  # noqa: PLC0415

    config = load_config(args.config, overrides=args.overrides)
    import jax  # noqa: PLC0415

    from tracker_eval.evaluation.activity import no_more_evaluations  # noqa: PLC0415
    from tracker_eval.runners import distributed  # noqa: PLC0415
    from tracker_eval.runners.pipeline import Components, Pipeline  # noqa: PLC0415

    suites = _chosen_suites(config, args.suite)
    components = Components.resolve(config)  # a typo fails now, not after waiting for peers
    distributed.initialize(config.distributed)
    from tracker_eval.checkpoints.remote import bound_storage_waits  # noqa: PLC0415
    from tracker_eval.loggers.session import LoggerSession  # noqa: PLC0415

    bound_storage_waits(config.checkpoint_dir)  # a dead bucket fails in seconds, not after minutes of retries
    session = LoggerSession.open(config) if distributed.is_primary() else None
    try:
        step = args.step
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
        pipeline = Pipeline(config, components=components, suites=suites)
        if config.has_suites:
            return _eval_suites(pipeline, step, session=session, output=args.output)
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
        if args.output:
            _write_json(args.output, result.to_json(per_example_lists=True))
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


if __name__ == "__main__":
    sys.exit(main())
