"""Delivery moving between live processes of one stream, with the real trackers: exactly once, and
the best summary never moves backwards. Each process is a real `PrimaryStream` (tests/stream_child.py)."""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from slow_proxy import SlowProxy
from stream_child import result_of
from watcher_harness import (
    LedgerBusy,
    assert_exactly_once,
    child_env,
    jsonl_points,
    ledger_execute,
    ledger_rows,
    mlflow_run,
    stored_metrics,
    wait_for,
    wandb_summary,
    write_config,
)

pytest_plugins = ["fixtures_mlflow", "watcher_harness", "fixtures_postgres", "ledger_backends"]

CHILD = pathlib.Path(__file__).with_name("stream_child.py")
LOGGERS = ("jsonl", "wandb", "mlflow")


class StreamProcess:
    """tests/stream_child.py as a subprocess: JSON commands in, JSON lines out (stderr kept)."""

    def __init__(self, config: pathlib.Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), str(config), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=child_env(devices=1), start_new_session=True,
            cwd=str(config.parent))
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._pump, args=(self.process.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self.errors.append), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, sink: Any) -> None:
        for line in stream:
            sink(line)

    def read(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout).strip()
        except queue.Empty:
            raise AssertionError(f"child {self.process.pid} said nothing for {timeout:g} s; stderr:\n"
                                 + "".join(self.errors[-30:])) from None

    def ready(self, timeout: float = 120) -> StreamProcess:
        line = self.read(timeout)
        assert line == "ready", f"child did not start: {line!r}\n{''.join(self.errors[-30:])}"
        return self

    def send(self, op: str, timeout: float = 120, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.read(timeout))

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"child {self.process.pid} still running after {timeout:g} s; stderr:\n"
                                 + "".join(self.errors[-30:])) from None

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


def _store(config: pathlib.Path, steps: dict[int, dict[str, float]]) -> None:
    """Stores results the way an evaluator does (claim, record), from this process."""
    from tracker_eval.config import load_config
    from tracker_eval.runners.stream import logger_names, open_ledger

    loaded = load_config(config)
    with open_ledger(loaded, loggers=logger_names(loaded)) as ledger:
        for step, metrics in steps.items():
            assert ledger.claim(step, owner="test-evaluator")
            assert ledger.record_metrics(result_of(step, metrics), owner="test-evaluator")


def _delivered_everywhere(out: pathlib.Path, steps: list[int]) -> bool:
    rows = ledger_rows(out)
    return all(s in rows and rows[s]["state"] == "delivered" for s in steps)


def _metrics(step: int) -> dict[str, float]:
    return {"loss": 1.0 / step, "accuracy": step / 100.0}


def test_delivery_lease_moving_between_live_processes_sends_every_step_once(tmp_path, mlflow_server, ledger_backend):
    out = tmp_path / "out"
    experiment = f"handover-{uuid.uuid4().hex[:8]}"
    loggers = [{"type": "jsonl"}, {"type": "wandb"},
               {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment}]
    config = write_config(tmp_path, loggers=loggers, watch={"delivery_deadline_s": 60})
    children: list[StreamProcess] = []
    try:
        _store(config, {10: _metrics(10), 20: _metrics(20)})
        b = StreamProcess(config).ready()
        children.append(b)
        # B delivers the first results: its loggers now hold what they learned of their trackers.
        wait_for(lambda: _delivered_everywhere(out, [10, 20]), timeout=120, what="steps 10, 20 delivered by B")
        a = StreamProcess(config, "--kill-before-ack", "40").ready()
        children.append(a)
        # B stalls past its delivery leases (SIGSTOP; the expiry is fast-forwarded in the ledger),
        # so A, alive all along, takes every logger over.
        _stop_outside_a_write(b.process.pid, out)
        _store(config, {30: _metrics(30), 40: _metrics(40), 50: _metrics(50)})
        # A delivers 30, writes 40 to every tracker and is killed before acknowledging it.
        assert a.wait(timeout=180) == -signal.SIGKILL, "".join(a.errors[-30:])
        rows = ledger_rows(out)
        assert all(rows[30]["deliveries"][n]["state"] == "delivered" for n in LOGGERS), rows[30]
        assert all(rows[40]["deliveries"][n]["state"] == "pending" for n in LOGGERS), rows[40]
        assert sorted(jsonl_points(out)) == [10, 20, 30, 40], "step 40 did not reach the JSONL file before the kill"
        marked = ledger_execute(out, "SELECT logger FROM outbox WHERE step = 40 AND sending_since IS NOT NULL")
        assert sorted(name for (name,) in marked) == sorted(LOGGERS)
        # B comes back and takes the leases over from the dead A: 40 must not be sent again.
        os.kill(b.process.pid, signal.SIGCONT)
        wait_for(lambda: _delivered_everywhere(out, [30, 40, 50]), timeout=180, what="steps 40, 50 delivered by B")
        _store(config, {60: _metrics(60)})
        wait_for(lambda: _delivered_everywhere(out, [60]), timeout=120, what="step 60 delivered by B")
        assert b.send("close", drain_s=30)["drained"]
        assert b.wait(timeout=60) == 0, "".join(b.errors[-30:])
    finally:
        for child in children:
            child.kill()
    assert_exactly_once(out, stored_metrics(out), mlflow=(mlflow_server.url, experiment), wandb=True)


def test_best_summary_never_moves_backwards_with_two_processes(tmp_path, mlflow_server, ledger_backend):
    out = tmp_path / "out"
    experiment = f"best-{uuid.uuid4().hex[:8]}"
    proxy = SlowProxy(mlflow_server.url, delay_s=0.5).start()  # process A's MLflow answers slowly
    try:
        watch = {"best": {"metric": "loss", "mode": "min"}}
        slow = write_config(tmp_path, name="a.yaml", watch=watch, loggers=[
            {"type": "wandb"}, {"type": "mlflow", "tracking_uri": proxy.url, "experiment": experiment}])
        fast = write_config(tmp_path, name="b.yaml", watch=watch, loggers=[
            {"type": "wandb"}, {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment}])
        a = StreamProcess(slow)
        b = StreamProcess(fast)
        try:
            a.ready()
            b.ready()
            # Interleaved bests, each better than the last; A's copy of an older one is still on
            # its slow way to MLflow when B publishes a newer one.
            for child, step, loss in ((a, 10, 0.5), (b, 20, 0.3), (a, 30, 0.2), (b, 40, 0.1)):
                assert child.send("record", step=step, metrics={"loss": loss, "accuracy": 1 - loss})["stored"]
            for child in (a, b):
                assert child.send("close", drain_s=90, timeout=180)["closed"]
                assert child.wait(timeout=60) == 0, "".join(child.errors[-30:])
        finally:
            a.kill()
            b.kill()
    finally:
        proxy.stop()
    assert json.loads((out / "best.json").read_text())["step"] == 40
    tags = mlflow_run(mlflow_server.url, experiment).data.tags
    assert (tags["tracker_eval.summary.best_step"], float(tags["tracker_eval.summary.best_loss"])) == ("40", 0.1)
    summary = wandb_summary(out)
    assert (summary["best_step"], summary["best_loss"]) == (40, 0.1)


def _stop_outside_a_write(pid: int, out: pathlib.Path) -> None:
    """SIGSTOPs `pid` and expires its delivery leases. Stopped in the middle of a ledger write it
    would hold the ledger's write lock for ever, so then it is let go on briefly and stopped again."""
    for _ in range(50):
        os.kill(pid, signal.SIGSTOP)
        try:
            ledger_execute(out, "UPDATE leases SET expires_at = 0 WHERE name LIKE 'deliver:%'", timeout_s=2)
            return
        except LedgerBusy:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
    raise AssertionError("the ledger stayed locked by the stopped process")
