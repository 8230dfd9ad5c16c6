"""Child process for the ledger tests: drives real transitions until killed, or competes for claims.

The ledger is the SQLite file in OUTPUT_DIR, or the PostgreSQL database TRACKER_EVAL_LEDGER_URL names.

    python tests/ledger_crash_child.py loop OUTPUT_DIR SEED       # runs until SIGKILL
    python tests/ledger_crash_child.py drain OUTPUT_DIR SEED      # runs until nothing is left to do
    python tests/ledger_crash_child.py compete OUTPUT_DIR GO_FILE N_STEPS   # prints the steps it won
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from tracker_eval.config.ledger import LedgerConfig, resolve_ledger_url
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.lease import make_owner_id
from tracker_eval.ledger.steps import Ledger, StepState

LOGGERS = ("a", "b")
LAST_STEP = 600


def expected_arrays(step: int) -> dict[str, np.ndarray]:
    """Per-example arrays that depend on the step only, so a reader can check any stored file."""
    n = 3 + step % 7
    return {
        "loss": (np.arange(n, dtype=np.float32) + np.float32(step)) / np.float32(3),
        "ids": np.arange(step, step + n, dtype=np.int64)[::-1].copy(),
    }


def open_ledger(output_dir: str) -> Ledger:
    """The ledger in `output_dir`, or in the PostgreSQL database that TRACKER_EVAL_LEDGER_URL names."""
    return Ledger(output_dir, checkpoint_dir="/ckpt", config_hash="crash", loggers=LOGGERS,
                  best_metric="loss", max_attempts=10_000, backoff_base_s=0.001, backoff_cap_s=0.002,
                  url=resolve_ledger_url(LedgerConfig()))


def work_once(ledger: Ledger, owner: str, rng: random.Random, *, eval_s: float) -> bool:
    """One round of registering, evaluating and delivering; returns False when nothing was left."""
    newest = ledger.newest_step() or 0
    if newest < LAST_STEP:
        # New steps arrive in increasing order, with an occasional late, lower one.
        late = [newest + 5] if rng.random() < 0.3 else []
        ledger.register([newest + 10, *late])
    busy = False
    for step in ledger.steps(StepState.PENDING, StepState.FAILED, StepState.EVALUATING):
        if not ledger.claim(step, owner=owner, ttl_s=60.0):
            continue
        busy = True
        time.sleep(rng.uniform(0.0, eval_s))  # the evaluation itself; kills often land here
        if rng.random() < 0.1:
            ledger.mark_failed(step, "flaky", owner=owner)
            continue
        result = EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": step / 7.0},
                            per_example=expected_arrays(step), provenance={"owner": owner})
        ledger.record_metrics(result, owner=owner)
    for logger in LOGGERS:
        if not ledger.claim_logger(logger, owner=owner, ttl_s=60.0):
            continue
        for step in ledger.due_deliveries(logger):
            busy = True
            if rng.random() < 0.2:
                ledger.mark_delivery_failed(step, logger, "outage", owner=owner)
            else:
                ledger.mark_delivered(step, logger, owner=owner)
    return busy or newest < LAST_STEP or any(ledger.next_delivery_at(lg) is not None for lg in LOGGERS)


def compete(output_dir: str, go_file: str, n_steps: int) -> None:
    ledger = open_ledger(output_dir)
    owner = make_owner_id()
    print("ready", flush=True)
    while not Path(go_file).exists():
        time.sleep(0.001)
    won = []
    for step in range(n_steps):
        if ledger.claim(step, owner=owner):
            won.append(step)
            result = EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": 1.0},
                                per_example=expected_arrays(step), provenance={"owner": owner})
            if not ledger.record_metrics(result, owner=owner):
                raise SystemExit(f"step {step}: claim won but result already stored")
    print(json.dumps({"owner": owner, "won": won}), flush=True)


def main() -> None:
    mode, output_dir = sys.argv[1], sys.argv[2]
    if mode == "compete":
        compete(output_dir, sys.argv[3], int(sys.argv[4]))
        return
    rng = random.Random(int(sys.argv[3]))
    ledger = open_ledger(output_dir)
    owner = make_owner_id()
    print("ready", flush=True)
    eval_s = 0.04 if mode == "loop" else 0.0
    while work_once(ledger, owner, rng, eval_s=eval_s) or mode == "loop":
        pass


if __name__ == "__main__":
    main()
