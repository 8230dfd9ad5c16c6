"""`tracker-eval eval` as a real subprocess on real Orbax checkpoints of the digits classifier."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from reference import restored_params, validation_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tracker_eval.tasks.train import train_classifier

    directory = tmp_path_factory.mktemp("cli") / "ckpts"
    train_classifier(directory, steps=40, save_every=20, learning_rate=0.01)
    return directory


def _config(tmp_path, checkpoints, extra=""):
    path = tmp_path / "eval.yaml"
    path.write_text(
        f"checkpoint_dir: {checkpoints}\n"
        "model: tracker_eval.tasks.classification:make_model\n"
        "eval_function: tracker_eval.tasks.classification:eval_function\n"
        "data: tracker_eval.tasks.classification:make_eval_data\n"
        "batch_size: 48\n"
        f"output_dir: {tmp_path / 'out'}\n" + extra
    )
    return path


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def _reference(checkpoints, step):
    """Independent: plain Orbax restore of the whole state, float64 numpy forward pass."""
    return validation_metrics(restored_params(checkpoints, step))


def test_eval_latest_prints_table_and_writes_json(tmp_path, checkpoints):
    out = tmp_path / "result.json"
    proc = _run("eval", "--config", _config(tmp_path, checkpoints), "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "eval step 40" in proc.stdout and "accuracy" in proc.stdout
    payload = json.loads(out.read_text())
    assert set(payload) == {"step", "checkpoint", "metrics"}
    assert payload["step"] == 40 and payload["checkpoint"].endswith("/40")
    losses, accuracy = _reference(checkpoints, 40)
    assert payload["metrics"]["loss"] == pytest.approx(losses.mean(), rel=1e-5)
    assert payload["metrics"]["accuracy"] == pytest.approx(accuracy, rel=1e-6)
    np.testing.assert_allclose(payload["metrics"]["example_loss"], losses, rtol=1e-4, atol=1e-6)


def test_eval_named_step_with_override(tmp_path, checkpoints):
    out = tmp_path / "r.json"
    proc = _run("eval", "--config", _config(tmp_path, checkpoints), "--step", 20, "--output", out,
                "mesh.data=2", "mesh.fsdp=2", "params_sharding=fsdp")
    assert proc.returncode == 0, proc.stderr
    losses, _ = _reference(checkpoints, 20)
    assert json.loads(out.read_text())["metrics"]["loss"] == pytest.approx(losses.mean(), rel=1e-5)


def test_nnx_model_evaluates_a_checkpoint_written_by_linen_training(tmp_path, checkpoints):
    # The nnx module's pure-dict params have the linen tree's shape; its own init values are replaced.
    out = tmp_path / "r.json"
    proc = _run("eval", "--config", _config(tmp_path, checkpoints), "--step", 20, "--output", out,
                "model=tracker_eval.tasks.classification:make_nnx_model", "model_kwargs={seed: 5}")
    assert proc.returncode == 0, proc.stderr
    losses, accuracy = _reference(checkpoints, 20)
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["loss"] == pytest.approx(losses.mean(), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy, rel=1e-6)


@pytest.mark.parametrize(
    "args, extra, message",
    [
        (["--step", "999"], "", "--step 999 is not a finalized checkpoint"),
        (["batch_sise=3"], "", "unknown config key batch_sise; valid keys:"),
        (["model=tracker_eval.tasks.classification:make_modle"], "", "no attribute 'make_modle'"),
        (["checkpoint.params=weights"], "", "checkpoint.params"),
        ([], "loggers: [{type: wandbb}]\n", "unknown logger type 'wandbb'; installed types:"),
        ([], "loggers: [{type: mlflow, nan_policy: drop}]\n", "mlflow nan_policy 'drop' is not one of"),
        # A typo fails before the distributed runtime waits (here up to 100 s) for a coordinator.
        (["model=tracker_eval.tasks.classification:make_modle"],
         "distributed: {coordinator_address: '127.0.0.1:9', num_processes: 2, process_id: 1,"
         " initialization_timeout_s: 100}\n", "no attribute 'make_modle'"),
    ],
)
def test_usage_and_config_errors_exit_2_with_one_line(tmp_path, checkpoints, args, extra, message):
    proc = _run("eval", "--config", _config(tmp_path, checkpoints, extra), *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command_shows_the_traceback(tmp_path, checkpoints, where):
    args = ["eval", "--config", _config(tmp_path, checkpoints), "batch_sise=3"]
    proc = _run(*(["--verbose", *args] if where == "before" else [*args, "--verbose"]))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tracker-eval: error: unknown config key batch_sise")


def test_empty_checkpoint_dir_exits_2(tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    proc = _run("eval", "--config", _config(tmp_path, empty))
    assert proc.returncode == 2 and "no finalized checkpoint" in proc.stderr


def test_corrupt_checkpoint_exits_1_with_one_line(tmp_path, checkpoints):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints, broken)
    for path in (broken / "40").rglob("*"):
        if path.is_file() and "ocdbt" not in path.name and path.parent.name in ("d",):
            path.write_bytes(b"")
    data_files = [p for p in (broken / "40").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    proc = _run("eval", "--config", _config(tmp_path, broken))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tracker-eval: failed:")]
    assert len(errors) == 1 and "step 40" in errors[0] and "corrupt" in errors[0], proc.stderr


def test_failing_logger_warns_and_still_exits_0(tmp_path, checkpoints):
    out = tmp_path / "r.json"
    extra = "loggers: [{type: 'failing_logger:FailingLogger', id: flaky}, {type: jsonl}]\n"
    proc = _run("eval", "--config", _config(tmp_path, checkpoints, extra), "--output", out)
    assert proc.returncode == 0, proc.stderr
    complaints = [line for line in proc.stderr.splitlines() if "flaky" in line]
    assert len(complaints) == 1, proc.stderr  # one warning per failing logger, not one per layer
    assert complaints[0].startswith("tracker-eval: warning: logger 'flaky': deliver of step 40 failed")
    assert "tracker rejected the request" in complaints[0]
    assert json.loads(out.read_text())["step"] == 40
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 40
