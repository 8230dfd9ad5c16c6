"""Child process for the delivery tests: one `PrimaryStream` (ledger, real loggers, delivery threads)
driven by JSON commands on stdin, as a watcher or an in-training evaluation holds it.

    python tests/stream_child.py CONFIG [--kill-before-ack STEP]

Prints ``ready`` once the stream is open, then answers each command with one JSON line:

    {"op": "record", "step": 30, "metrics": {"loss": 0.2}}   # claim and store a result (-> publish best)
    {"op": "close", "drain_s": 60}                            # close the stream, then exit 0

With ``--kill-before-ack STEP`` the process SIGKILLs itself once every logger has written STEP to
its tracker (its flush returned) and none has acknowledged it in the ledger yet: the crash between
the tracker write and `mark_delivered` that exactly-once delivery must survive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

import numpy as np

from tracker_eval.config import load_config
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.steps import Ledger
from tracker_eval.logs import configure_logging, quiet_environment
from tracker_eval.runners.stream import PrimaryStream


def result_of(step: int, metrics: dict[str, float]) -> EvalResult:
    """A stored result whose per-example arrays depend on the step only."""
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics=dict(metrics),
                      per_example={"example_loss": np.arange(4, dtype=np.float32) + step},
                      provenance={"source": "stream_child"}, time=1_700_000_000.0 + step)


def kill_before_ack(step: int, loggers: list[str]) -> None:
    """Makes every logger's acknowledgement of `step` wait for the others, then kills the process."""
    arrived: set[str] = set()
    lock = threading.Lock()
    real = Ledger.mark_delivered

    def mark_delivered(self: Ledger, at: int, logger: str, *, owner: str) -> bool:
        if int(at) != step:
            return real(self, at, logger, owner=owner)
        with lock:
            arrived.add(logger)
            everyone = arrived >= set(loggers)
        if everyone:
            print(json.dumps({"killing": step}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()  # never acknowledged: the kill comes first
        return False

    Ledger.mark_delivered = mark_delivered  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--kill-before-ack", type=int, default=None)
    args = parser.parse_args()
    quiet_environment()
    configure_logging(verbose=False)
    config = load_config(args.config)
    stream = PrimaryStream.open(config)
    if args.kill_before_ack is not None:
        kill_before_ack(args.kill_before_ack, list(stream.ledger.loggers))
    print("ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "record":
            step = int(command["step"])
            claimed = stream.ledger.claim(step, owner=stream.owner)
            stored = claimed and stream.record(result_of(step, command["metrics"]))
            print(json.dumps({"step": step, "stored": bool(stored)}), flush=True)
        elif command["op"] == "close":
            drained = stream.close(drain_s=float(command.get("drain_s", 60)), close_timeout_s=30.0)
            stream.ledger.close()
            print(json.dumps({"closed": True, "drained": drained}), flush=True)
            return


if __name__ == "__main__":
    main()
