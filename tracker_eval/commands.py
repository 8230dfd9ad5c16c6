"""The grammar of the `tracker-eval` command line: every subcommand, option and help text.

    args = build_parser().parse_args(["status", "--config", "watch.yaml", "--json"])
    args.command, args.json    # "status", True

`tracker_eval.cli` parses with it and runs the command; keeping the grammar here leaves that module
to what the commands do.
"""

from __future__ import annotations

import argparse


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
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{eval,watch,status,retry,compare,gate,ledger,demo}")

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

    le = sub.add_parser("ledger", parents=[common], help="move a run's ledger: `ledger copy` into PostgreSQL")
    le_sub = le.add_subparsers(dest="ledger_command", required=True, metavar="{copy}")
    lc = le_sub.add_parser("copy", parents=[common], help="copy the SQLite ledger's history into a PostgreSQL database")
    lc.add_argument("--config", required=True, help="YAML config file (the watcher's; its output_dir holds the ledger)")
    lc.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST:PORT/DATABASE")
    lc.add_argument("overrides", nargs="*", metavar="key=value")

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
