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
import logging
import os
import sys
from collections.abc import Sequence

from tracker_eval.commands import build_parser
from tracker_eval.errors import ConfigError, UsageError, one_line
from tracker_eval.logs import configure_logging, quiet_environment

LOG = logging.getLogger("tracker_eval")




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
        from tracker_eval.runners.one_shot import run_eval  # noqa: PLC0415

        return run_eval(args.config, overrides=args.overrides, step=args.step, suites=args.suite, output=args.output)
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


if __name__ == "__main__":
    sys.exit(main())
