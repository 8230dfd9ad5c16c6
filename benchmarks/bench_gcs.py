"""GCS benchmark: what one poll of a bucket costs, and how soon a finished checkpoint is found there.

Against fake-gcs-server on loopback (the emulator the tests use, tests/fixtures_gcs.py); requests
are counted from the emulator's own request log, not by the code under test.

- `gcs_poll_requests_1000`: JSON-API requests of one steady-state poll (`GcsStepLister`) of a root
  holding 1,000 finished steps; `..._inflight` with one more step being saved (no marker yet);
  `gcs_poll_first_requests_1000`: the first poll, which settles every step. The emulator ignores
  `matchGlob`, so that first poll pages through every object (1,000 per page); real GCS returns
  only the markers. Target: <= 2 per steady-state poll.
- `gcs_orbax_poll_requests_per_step`: what Orbax's own listing (`ocp.utils.checkpoint_steps`, listing
  cache off) costs per finished step, on 20 steps, for comparison.
- `gcs_detect_latency_s`: seconds from the write of a step's `commit_success.txt` to a real
  `tracker-eval watch` subprocess logging "found checkpoint step N", at `poll_interval_s: 1`;
  median over 10 checkpoints, each finished at a random point of the poll cycle.

    python -m benchmarks gcs
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

STEPS = 1000
POLLS = 20
CHECKPOINTS = 10
POLL_INTERVAL_S = 1.0
ORBAX_STEPS = 20


def _emulator(root: pathlib.Path) -> Any:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from fixtures_gcs import GcsEmulator  # noqa: PLC0415 - test tooling, shared with the tests

    return GcsEmulator(root).start()


def _fill(gcs: Any, root: str, steps: Iterable[int], *, marker: bool = True) -> None:
    """Minimal steps (step metadata, item metadata, marker); the listing does not read them."""
    def one(step: int) -> None:
        gcs.upload(f"{root}/{step}/_CHECKPOINT_METADATA", b"{}")
        gcs.upload(f"{root}/{step}/default/_METADATA", b"{}")
        if marker:
            gcs.write_marker(f"{root}/{step}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, steps))


def poll_requests(gcs: Any) -> dict[str, float]:
    """Requests per poll, counted in the emulator's log."""
    from tracker_eval.checkpoints.gcs import GcsStepLister  # noqa: PLC0415

    gcs.create_bucket("bench-poll")
    root = "gs://bench-poll/run"
    _fill(gcs, root, range(100, 100 * (STEPS + 1), 100))

    def counted(lister: GcsStepLister) -> tuple[int, int]:
        before = gcs.request_count("/b/bench-poll/")
        found = lister.finalized_steps()
        time.sleep(0.05)  # the emulator writes its log line after answering
        return gcs.request_count("/b/bench-poll/") - before, len(found)

    lister = GcsStepLister(root)
    first, found = counted(lister)
    assert found == STEPS, found
    steady = [counted(lister)[0] for _ in range(POLLS)]
    _fill(gcs, root, [100 * (STEPS + 1)], marker=False)  # a save in flight
    inflight = [counted(lister)[0] for _ in range(POLLS)]
    lister.close()
    return {"gcs_poll_requests_1000": statistics.median(steady),
            "gcs_poll_requests_1000_inflight": statistics.median(inflight),
            "gcs_poll_first_requests_1000": float(first)}


def orbax_requests_per_step(gcs: Any, env: dict[str, str]) -> float:
    """Orbax's own listing of finished steps, in a child with the listing cache off."""
    gcs.create_bucket("bench-orbax")
    root = "gs://bench-orbax/run"
    _fill(gcs, root, range(1, ORBAX_STEPS + 1))
    code = ("import sys, orbax.checkpoint as ocp\n"
            "steps = ocp.utils.checkpoint_steps(sys.argv[1])\n"
            "assert len(steps) == int(sys.argv[2]), steps\n")
    before = gcs.request_count("/b/bench-orbax/")
    subprocess.run([sys.executable, "-c", code, root, str(ORBAX_STEPS)], env=env, check=True, timeout=600)
    time.sleep(0.05)
    return (gcs.request_count("/b/bench-orbax/") - before) / ORBAX_STEPS


def detection_latency(gcs: Any, env: dict[str, str], source: pathlib.Path, work: pathlib.Path) -> list[float]:
    """Seconds from each marker write to the watcher's "found checkpoint step N" line."""
    from benchmarks.bench_watcher import _Lines  # noqa: PLC0415

    gcs.create_bucket("bench-detect")
    root = "gs://bench-detect/run"
    config = {
        "checkpoint_dir": root,
        "model": "tracker_eval.tasks.classification:make_model",
        "eval_function": "tracker_eval.tasks.classification:eval_function",
        "data": "tracker_eval.tasks.classification:make_eval_data",
        "data_kwargs": {"limit": 64},  # detection is measured, not evaluation
        "batch_size": 64,
        "output_dir": str(work / "out"),
        "loggers": [{"type": "jsonl"}],
        "watch": {"poll_interval_s": POLL_INTERVAL_S, "idle_timeout_s": 600},
    }
    (work / "watch.yaml").write_text(json.dumps(config))
    exe = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
    process = subprocess.Popen([exe, "watch", "--config", str(work / "watch.yaml")], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    rng = random.Random(0)
    try:
        lines = _Lines(process)
        lines.wait(r"watching ", timeout=180)
        latencies = []
        for step in range(1, CHECKPOINTS + 1):
            gcs.publish_step(source, root, 1, as_step=step, marker=False)
            time.sleep(rng.uniform(0.0, POLL_INTERVAL_S))  # finish at a random point of the poll cycle
            written = gcs.write_marker(f"{root}/{step}")
            found = lines.wait(rf"found checkpoint step {step}$", timeout=60)
            latencies.append(found - written)
            lines.wait(rf"step {step} evaluated", timeout=120)
        return latencies
    finally:
        process.kill()
        process.wait(timeout=30)


def run() -> dict[str, float]:
    """Requests per poll (steady, with a save in flight, first), Orbax's for comparison, detection latency."""
    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-gcs-") as tmp:
        work = pathlib.Path(tmp)
        gcs = _emulator(work / "gcs")
        try:
            env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
            env.update(gcs.env(), XLA_FLAGS="--xla_force_host_platform_device_count=1",
                       JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
            saved = {k: os.environ.get(k) for k in gcs.env()}
            os.environ.update(gcs.env())  # this process's lister talks to the emulator too
            try:
                figures = poll_requests(gcs)
            finally:
                for key, value in saved.items():
                    os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
            figures["gcs_orbax_poll_requests_per_step"] = orbax_requests_per_step(gcs, env)
            train_classifier(work / "source", steps=1, save_every=1)
            latencies = detection_latency(gcs, env, work / "source", work)
        finally:
            gcs.stop()
    figures["gcs_detect_latency_s"] = statistics.median(latencies)
    figures["gcs_detect_latency_max_s"] = max(latencies)
    return figures


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<36} {value:.4f}")
