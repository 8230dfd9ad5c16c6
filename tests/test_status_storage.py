"""`status` and `eval` where the checkpoint storage cannot answer, and `status` into a closed pipe.

Real commands in subprocesses; gs:// against a real GCS server on loopback (fake-gcs-server), the
ledger a real one written by `Ledger` the way the watcher writes it.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time

import numpy as np
from fixtures_gcs import free_port
from watcher_harness import EXE, child_env

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.identity import stream_hash
from tracker_eval.ledger.steps import Ledger

pytest_plugins = ["fixtures_gcs", "fixtures_postgres", "ledger_backends"]

MISSING = "gs://no-such-bucket/exp/run"
CLASSIFICATION = "tracker_eval.tasks.classification"


def _config(tmp_path: pathlib.Path, checkpoint_dir: str) -> pathlib.Path:
    path = tmp_path / "watch.yaml"
    path.write_text(json.dumps({
        "checkpoint_dir": checkpoint_dir, "output_dir": str(tmp_path / "out"),
        "model": f"{CLASSIFICATION}:make_model", "eval_function": f"{CLASSIFICATION}:eval_function",
        "data": f"{CLASSIFICATION}:make_eval_data", "batch_size": 64, "loggers": [{"type": "jsonl"}],
    }))
    return path


def _ledger_with_a_result_and_a_heartbeat(config_path: pathlib.Path) -> None:
    """Step 10 evaluated and a fresh heartbeat, as a live watcher of `config_path` leaves them."""
    from tracker_eval.config import load_config, resolve_ledger_url

    config = load_config(config_path)
    with Ledger(config.output_dir, checkpoint_dir=config.checkpoint_dir, config_hash=stream_hash(config),
                loggers=["jsonl"], url=resolve_ledger_url(config.ledger)) as ledger:
        assert ledger.claim(10, owner="watcher")
        assert ledger.record_metrics(EvalResult(step=10, checkpoint=f"{config.checkpoint_dir}/10",
                                                metrics={"loss": 0.5}, per_example={"loss": np.ones(2)}),
                                     owner="watcher")
        ledger.touch_heartbeat("watcher")


def _run(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=180, env=env, **kwargs)


def test_status_says_in_one_line_why_a_bucket_cannot_be_listed(tmp_path, gcs):
    config = _config(tmp_path, MISSING)
    _ledger_with_a_result_and_a_heartbeat(config)
    env = {**child_env(), **gcs.env()}

    shown = _run("status", "--config", str(config), env=env)
    assert shown.returncode == 0, shown.stderr
    expected = (f"newest checkpoint: unknown (cannot list {MISSING}: HTTP 404: bucket 'no-such-bucket' does "
                "not exist; check checkpoint_dir)")
    assert expected in shown.stdout.splitlines()[-1], shown.stdout
    doc = json.loads(_run("status", "--config", str(config), "--json", env=env).stdout)
    assert "bucket 'no-such-bucket' does not exist" in doc["storage_error"]
    assert doc["newest_step"] is None and [s["step"] for s in doc["steps"]] == [10]

    down = {**child_env(), **gcs.env(f"http://127.0.0.1:{free_port()}")}  # nothing listens there
    shown = _run("status", "--config", str(config), env=down)
    assert shown.returncode == 0, shown.stderr
    last = shown.stdout.splitlines()[-1]
    assert last.startswith(f"newest checkpoint: unknown (cannot list {MISSING}: ConnectionError"), shown.stdout


def test_health_answers_from_the_ledger_where_no_credential_reads_the_bucket(tmp_path, ledger_backend):
    config = _config(tmp_path, MISSING)
    _ledger_with_a_result_and_a_heartbeat(config)
    env = {k: v for k, v in child_env().items()
           if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(CLOUDSDK_CONFIG=str(tmp_path / "no-gcloud"), NO_GCE_CHECK="true")  # no credential anywhere

    listing = _run("status", "--config", str(config), env=env)
    assert listing.returncode == 2 and "no Google credentials" in listing.stderr, listing  # it is so
    health = _run("status", "--config", str(config), "--health", env=env)
    assert health.returncode == 0, health.stderr
    assert health.stdout.startswith("healthy: last watcher heartbeat"), health.stdout


def test_eval_on_a_missing_bucket_is_a_one_line_config_error(tmp_path, gcs):
    config = _config(tmp_path, MISSING)
    proc = _run("eval", "--config", str(config), "loggers=[]", env={**child_env(), **gcs.env()})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"tracker-eval: error: cannot list {MISSING}: HTTP 404: bucket 'no-such-bucket' does not exist; "
        "check checkpoint_dir"]


def test_status_into_a_pipe_whose_reader_is_gone_ends_quietly(tmp_path):
    """`tracker-eval status --json | head`: `head` may exit before status writes; nothing to report."""
    (tmp_path / "ckpts" / "10").mkdir(parents=True)
    config = _config(tmp_path, str(tmp_path / "ckpts"))
    _ledger_with_a_result_and_a_heartbeat(config)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write: every write fails with EPIPE
    try:
        proc = subprocess.run([EXE, "status", "--config", str(config), "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=180, env=child_env())
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_health_turns_unhealthy_after_watch_health_stale_s(tmp_path):
    """The image's HEALTHCHECK and the Kubernetes probes read the config's `watch.health_stale_s`."""
    (tmp_path / "ckpts").mkdir()
    config = _config(tmp_path, str(tmp_path / "ckpts"))
    _ledger_with_a_result_and_a_heartbeat(config)
    beat = time.time()
    healthy = _run("status", "--config", str(config), "--health", env=child_env())  # default: 120 s
    assert healthy.returncode == 0 and healthy.stdout.startswith("healthy"), healthy.stdout + healthy.stderr
    deadline = beat + 60
    while time.time() < deadline:
        shown = _run("status", "--config", str(config), "--health", "watch.health_stale_s=1", env=child_env())
        if shown.returncode == 1:
            break
    assert shown.returncode == 1 and shown.stdout.startswith("unhealthy: last watcher heartbeat"), shown.stdout
    assert time.time() - beat > 1  # never before the heartbeat was a second old
