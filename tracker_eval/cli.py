"""The `tracker-eval` command line: eval, watch, status, retry, demo.

    tracker-eval eval --config eval.yaml [--step N] [--suite NAME ...] [--output result.json] [key=value ...]
    tracker-eval watch --config watch.yaml [key=value ...]
    tracker-eval status --config watch.yaml [--json]
    tracker-eval retry --config watch.yaml [--step N] [--logger ID]
    tracker-eval compare --config watch.yaml A B [--suite NAME ...] [--json]
    tracker-eval gate --config watch.yaml --step N --against best|STEP --metric NAME [--suite NAME] [--p 0.05]
    tracker-eval retry --config watch.yaml --skipped [--step N] [--suite NAME]
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

from tracker_eval.errors import ConfigError, UsageError, one_line
from tracker_eval.logs import configure_logging, quiet_environment

LOG = logging.getLogger("tracker_eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracker-eval",
        description="Evaluate JAX/Flax Orbax checkpoints and log the results to W&B, MLflow and friends.",
    )
    parser.add_argument("--verbose", action="store_true", help="show library logs and tracebacks")
    # Accepted after the subcommand too (`tracker-eval eval --verbose ...`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show library logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{eval,watch,status,retry,compare,gate,demo}")

    ev = sub.add_parser("eval", parents=[common], help="evaluate one checkpoint (the latest finalized one by default)")
    ev.add_argument("--config", required=True, help="YAML config file")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest finalized)")
    ev.add_argument("--output", default=None, help="write the result as JSON to this file")
    ev.add_argument("--suite", action="append", default=None, metavar="NAME",
                    help="evaluate only this suite (repeatable; default: every suite)")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, nested keys with dots")

    wa = sub.add_parser("watch", parents=[common], help="evaluate every new finalized checkpoint as it appears")
    wa.add_argument("--config", required=True, help="YAML config file")
    wa.add_argument("overrides", nargs="*", metavar="key=value")

    st = sub.add_parser("status", parents=[common], help="per-step state of the watcher's ledger")
    st.add_argument("--config", required=True, help="YAML config file")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--health", action="store_true", help="exit 0 only if a watcher is alive (container HEALTHCHECK)")
    st.add_argument("overrides", nargs="*", metavar="key=value")

    re_ = sub.add_parser("retry", parents=[common],
                         help="queue undeliverable deliveries again, once fixed; --skipped: evaluate skipped steps")
    re_.add_argument("--config", required=True, help="YAML config file (the watcher's)")
    re_.add_argument("--step", type=int, default=None, help="only this checkpoint step (default: every step)")
    re_.add_argument("--logger", default=None, metavar="ID", help="only this logger (its id; default: every logger)")
    re_.add_argument("--skipped", action="store_true",
                     help="ask for skipped steps instead: they are evaluated despite their suite's policy")
    re_.add_argument("--suite", default=None, metavar="NAME",
                     help="with --skipped: only this suite (default: every suite)")
    re_.add_argument("overrides", nargs="*", metavar="key=value")

    co = sub.add_parser("compare", parents=[common], help="paired comparison of two evaluated steps")
    co.add_argument("--config", required=True, help="YAML config file (the watcher's)")
    co.add_argument("step_a", type=int, metavar="A", help="the reference step")
    co.add_argument("step_b", type=int, metavar="B", help="the step compared with it (differences are B - A)")
    co.add_argument("--suite", action="append", default=None, metavar="NAME",
                    help="only this suite (repeatable; default: every suite)")
    co.add_argument("--json", action="store_true", help="machine-readable output")
    co.add_argument("overrides", nargs="*", metavar="key=value")

    ga = sub.add_parser("gate", parents=[common],
                        help="exit 1 when a step is significantly worse than the best or a named step")
    ga.add_argument("--config", required=True, help="YAML config file (the watcher's)")
    ga.add_argument("--step", type=int, required=True, help="the step under test")
    ga.add_argument("--against", required=True, metavar="best|STEP", help="the reference: best, or a step")
    ga.add_argument("--metric", required=True, help="a metric with per-example values (e.g. loss, accuracy)")
    ga.add_argument("--suite", default=None, metavar="NAME", help="the metric's suite (needed with several)")
    ga.add_argument("--p", type=float, default=0.05, help="significance threshold of the paired test (0.05)")
    ga.add_argument("--mode", choices=("min", "max"), default=None,
                    help="lower (min) or higher (max) is better; default from watch.best or watch.alerts")
    ga.add_argument("overrides", nargs="*", metavar="key=value")

    de = sub.add_parser("demo", parents=[common], help="train a small model, watch its checkpoints, log everywhere")
    de.add_argument("--output-dir", default=None,
                    help="where the demo writes everything (default runs/demo, with --harness runs/demo-harness)")
    de.add_argument("--steps", type=int, default=None, help="training steps (default from the demo config)")
    de.add_argument("--no-wandb", action="store_true", help="skip the W&B logger")
    de.add_argument("--no-mlflow", action="store_true", help="skip the MLflow logger")
    de.add_argument("--no-tensorboard", action="store_true", help="skip the TensorBoard logger")
    de.add_argument("--in-training", action="store_true", help="evaluate every other checkpoint inside training")
    de.add_argument("--harness", action="store_true",
                    help="train the byte-level LM on pydoc text; the LM Evaluation Harness scores each checkpoint")
    de.add_argument("--limit", type=int, default=None,
                    help="with --harness: documents per harness task (default 40)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    quiet_environment()
    parser = build_parser()
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
