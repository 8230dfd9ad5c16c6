"""Start-up benchmarks: does a watcher's start grow with its trackers' history; what does a cold start cost?

A stream with 300 results already delivered to JSONL, MLflow (a real server on loopback) and W&B
(offline; one run directory per delivery, as the outbox makes them) is restarted with one new
checkpoint waiting; the same start with no history is the reference. Two times per start, from
spawning `tracker-eval watch` (a real subprocess): to its first poll (the "found checkpoint step"
line), and to the new step being delivered to all three trackers (the ledger says so). Medians
over 3 starts of each kind, alternating; a copy of the history directory per start.

Cold start (`cold_start`): `tracker-eval eval` of the digits MLP (linen) on one local checkpoint,
console logger only, from spawning the process to its exit, against a process that only imports
jax, flax.linen and orbax.checkpoint (the floor any evaluation of a linen model pays). Pairs run
back to back, alternating, `COLD_PAIRS` of them; the figure is the ratio of the two medians. What
the config does not use (gcsfs for gs://, flax.nnx for an nnx model, tracker libraries not
configured) must not be imported.

    python -m benchmarks startup
    run()          # {"startup_history_ratio": ..., "cold_start_vs_import_floor": ..., ...}
    cold_start()   # only the cold start figures (a minute)

Targets: startup_history_ratio <= 1.5; cold_start_vs_import_floor <= 1.8.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HISTORY = 300
REPEATS = 3
NEW_STEP = 100_000
COLD_PAIRS = 7
IMPORT_FLOOR = "import jax, flax.linen, orbax.checkpoint"


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               WANDB_MODE="offline", WANDB_SILENT="true")
    return env


def _config(root: pathlib.Path, out: pathlib.Path, *, mlflow_url: str, experiment: str) -> pathlib.Path:
    config = {
        "checkpoint_dir": str(root / "ckpts"),
        "model": "tracker_eval.tasks.classification:make_model",
        "eval_function": "tracker_eval.tasks.classification:eval_function",
        "data": "tracker_eval.tasks.classification:make_eval_data",
        "data_kwargs": {"limit": 64},  # start-up is measured, not evaluation: keep it short
        "batch_size": 64,
        "output_dir": str(out),
        "loggers": [{"type": "jsonl"}, {"type": "wandb", "mode": "offline"},
                    {"type": "mlflow", "tracking_uri": mlflow_url, "experiment": experiment}],
        "watch": {"poll_interval_s": 1.0, "idle_timeout_s": 600},
    }
    path = out.with_suffix(".yaml")
    path.write_text(json.dumps(config))
    return path


def _build_history(config_path: pathlib.Path, steps: int) -> None:
    """Stores `steps` results and delivers them to every tracker through the real outbox."""
    import numpy as np  # noqa: PLC0415

    from tracker_eval.config import load_config  # noqa: PLC0415
    from tracker_eval.evaluation.result import EvalResult  # noqa: PLC0415
    from tracker_eval.runners.stream import PrimaryStream  # noqa: PLC0415

    stream = PrimaryStream.open(load_config(config_path))
    try:
        for step in range(1, steps + 1):
            result = EvalResult(step=step, checkpoint=f"/ckpts/{step}", metrics={"loss": 1.0 / step, "accuracy": 0.5},
                                per_example={"example_loss": np.full(64, 1.0 / step, np.float32)})
            assert stream.ledger.claim(step, owner=stream.owner)
            stream.ledger.record_metrics(result, owner=stream.owner)
        stream.delivery.notify()
        deadline = time.monotonic() + 3600
        while any(stream.delivery.pending().values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"history not delivered within an hour: {stream.delivery.pending()}")
            time.sleep(0.5)
    finally:
        stream.close(drain_s=60, close_timeout_s=60)
        stream.ledger.close()


def _delivered(out: pathlib.Path, step: int) -> bool:
    try:
        with sqlite3.connect(out / "ledger.sqlite", timeout=30) as conn:
            row = conn.execute("SELECT state FROM steps WHERE step = ?", (step,)).fetchone()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == "delivered"


def _start(config_path: pathlib.Path, out: pathlib.Path) -> tuple[float, float]:
    """(seconds to the first poll, seconds to the new step delivered everywhere) of one watcher start."""
    from benchmarks.bench_watcher import _Lines  # noqa: PLC0415

    exe = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
    started = time.time()
    process = subprocess.Popen([exe, "watch", "--config", str(config_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=_child_env(), start_new_session=True)
    try:
        lines = _Lines(process)
        polled = lines.wait(r"found checkpoint step", timeout=900) - started
        deadline = time.monotonic() + 900
        while not _delivered(out, NEW_STEP):
            if time.monotonic() > deadline or process.poll() is not None:
                tail = "".join(line for _, line in lines.items[-20:])
                raise RuntimeError(f"step {NEW_STEP} not delivered; output:\n{tail}")
            time.sleep(0.02)
        return polled, time.time() - started
    finally:
        try:
            os.killpg(process.pid, 9)  # the watcher and the wandb-core it started
        except ProcessLookupError:
            pass
        process.wait(timeout=60)


def _timed(command: list[str], *, cwd: pathlib.Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process) of one run of `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=_child_env(), cwd=str(cwd), timeout=600)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cold_start() -> dict[str, float]:
    """Median seconds of `tracker-eval eval` on a local checkpoint and of importing the floor, and their ratio.

    The CPU-time ratio beside it depends less on what else the machine runs than the wall-time one.
    """
    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    exe = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        root = pathlib.Path(tmp)
        train_classifier(root / "ckpts", steps=1, save_every=1)
        config = root / "eval.yaml"
        config.write_text(json.dumps({
            "checkpoint_dir": str(root / "ckpts"), "output_dir": str(root / "out"),
            "model": "tracker_eval.tasks.classification:make_model",
            "eval_function": "tracker_eval.tasks.classification:eval_function",
            "data": "tracker_eval.tasks.classification:make_eval_data", "data_kwargs": {"limit": 64},
            "batch_size": 64, "loggers": [{"type": "console"}]}))
        evaluate = [exe, "eval", "--config", str(config)]
        floor = [sys.executable, "-c", IMPORT_FLOOR]
        _timed(evaluate, cwd=root)  # warms the file cache and the host data cache alike for every pair
        times: dict[str, list[tuple[float, float]]] = {"eval": [], "floor": []}
        for _ in range(COLD_PAIRS):
            times["eval"].append(_timed(evaluate, cwd=root))
            times["floor"].append(_timed(floor, cwd=root))
    wall = {kind: statistics.median(w for w, _ in values) for kind, values in times.items()}
    cpu = {kind: statistics.median(c for _, c in values) for kind, values in times.items()}
    return {"cold_start_vs_import_floor": wall["eval"] / wall["floor"],
            "cold_start_cpu_vs_import_floor": cpu["eval"] / cpu["floor"],
            "cold_start_eval_s": wall["eval"], "cold_start_import_floor_s": wall["floor"]}


def run() -> dict[str, float]:
    """Medians of both start-up times with 300 delivered steps and with none, their ratios, and the cold start."""
    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from fixtures_mlflow import MlflowServer  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = pathlib.Path(tmp)
        server = MlflowServer(root / "mlflow", start_timeout_s=600).start()  # a busy machine starts it slowly
        try:
            train_classifier(root / "source", steps=1, save_every=1)
            shutil.copytree(root / "source" / "1", root / "ckpts" / str(NEW_STEP))
            history = root / "history"
            started = time.perf_counter()
            _build_history(_config(root, history, mlflow_url=server.url, experiment="history"), HISTORY)
            build_s = time.perf_counter() - started
            runs: dict[str, list[tuple[float, float]]] = {"history": [], "empty": []}
            for i in range(REPEATS):
                out = root / f"history-{i}"
                shutil.copytree(history, out)
                runs["history"].append(_start(_config(root, out, mlflow_url=server.url, experiment="history"), out))
                out = root / f"empty-{i}"
                out.mkdir()
                runs["empty"].append(_start(_config(root, out, mlflow_url=server.url, experiment=f"empty-{i}"), out))
        finally:
            server.stop()
    poll = {kind: statistics.median(p for p, _ in times) for kind, times in runs.items()}
    first = {kind: statistics.median(d for _, d in times) for kind, times in runs.items()}
    return {
        "startup_history_ratio": poll["history"] / poll["empty"],
        "first_delivery_history_ratio": first["history"] / first["empty"],
        "startup_first_poll_300_s": poll["history"],
        "startup_first_poll_0_s": poll["empty"],
        "startup_first_delivery_300_s": first["history"],
        "startup_first_delivery_0_s": first["empty"],
        "startup_history_build_s": build_s,
        **cold_start(),
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<34} {value:.4f}")
