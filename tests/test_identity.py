"""Result identity (`tracker_eval.identity`): a changed suite's new numbers reach every tracker under
keys of their own, restating a default or changing packing is not a change, and an existing ledger's
streams stay its streams."""

from __future__ import annotations

import collections
import hashlib
import json
import pathlib
import sqlite3
import subprocess
import uuid
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from test_suites import VAL, run_watch, status_json, suite, write_suites_config
from tracker_eval_tensorboard.logger import default_run_name
from watcher_harness import EXE, child_env, mlflow_points, mlflow_run, publish, wandb_rows, wandb_summary

from tracker_eval.config import load_config
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.identity import best_key, earlier_suite_hashes, run_hash, stream_hash, suite_hash, tracker_run_key
from tracker_eval.ledger.files import encode_result
from tracker_eval.ledger.schema import _MIGRATIONS, SCHEMA_VERSION
from tracker_eval.ledger.steps import Ledger
from tracker_eval.ledger.view import read_suite_versions
from tracker_eval.loggers.jsonl import read_jsonl
from tracker_eval.runners.stream import open_ledger

pytest_plugins = ["fixtures_mlflow", "watcher_harness", "fixtures_postgres", "ledger_backends"]

STEPS = (20, 40)
LIMIT = 100  # the changed suite: the first 100 validation examples instead of all of them


def val_references(checkpoint_dir: pathlib.Path, step: int) -> dict[int, dict[str, float]]:
    """Float64 numpy loss and accuracy of the validation set at `step`: version 1 (all examples)
    and version 2 (the first `LIMIT`)."""
    from reference import mlp_losses, restored_params  # noqa: PLC0415

    from tracker_eval.tasks.classification import split_digits  # noqa: PLC0415 - the data only

    params = restored_params(checkpoint_dir, step)
    x, y = split_digits("validation")
    out = {}
    for version, limit in ((1, None), (2, LIMIT)):
        losses, correct = mlp_losses(params, x[:limit], y[:limit])
        out[version] = {"loss": float(np.mean(losses)), "accuracy": float(np.mean(correct))}
    return out


def test_a_changed_suite_reaches_every_tracker_under_its_own_keys_and_status_keeps_the_old_results(
    tmp_path, source_checkpoints, mlflow_server
):
    experiment = f"identity-{uuid.uuid4().hex[:8]}"
    loggers = [{"type": "jsonl"}, {"type": "tensorboard"}, {"type": "wandb"},
               {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment}]
    for step in STEPS:
        publish(source_checkpoints, tmp_path / "ckpts", step)
    best = {"best": {"metric": "loss", "mode": "min"}}
    first = write_suites_config(tmp_path, {"val": VAL}, loggers=loggers, watch=best, name="first.yaml")
    run_watch(first)
    changed = write_suites_config(tmp_path, {"val": suite(batch_size=64, data_kwargs={"limit": LIMIT})},
                                  loggers=loggers, watch=best, name="changed.yaml")
    watcher = run_watch(changed)
    assert watcher.text.count("evaluating step 20") == 1, watcher.tail()  # the new version, once
    out = tmp_path / "out"
    want = {step: val_references(tmp_path / "ckpts", step) for step in STEPS}
    labels = {1: "val", 2: "val-v2"}

    # JSONL: each (step, version) once, the second version marked as such.
    versions = collections.Counter()
    for record in read_jsonl(out / "metrics.jsonl"):
        version = record.get("suite_version", 1)
        versions[(record["step"], version)] += 1
        assert record["suite"] == "val"
        assert record["metrics"]["loss"] == pytest.approx(want[record["step"]][version]["loss"], rel=1e-5)
    assert versions == {(step, version): 1 for step in STEPS for version in (1, 2)}

    # MLflow, TensorBoard (event files read back), W&B offline: one point per key and step, each
    # version's values under its own keys in the one tracker run.
    history = mlflow_points(mlflow_server.url, experiment)
    config = load_config(changed)
    accumulator = event_accumulator.EventAccumulator(
        str(out / "tensorboard" / default_run_name(tracker_run_key(config)))).Reload()
    rows = [r for r in wandb_rows(out) if "checkpoint_step" in r]
    for version, label in labels.items():
        for metric in ("loss", "accuracy"):
            key = f"eval/{label}/{metric}"
            expected = [(step, want[step][version][metric]) for step in STEPS]
            for tracker, points in (("mlflow", sorted(history[key])),
                                    ("tensorboard", [(e.step, e.value) for e in accumulator.Scalars(key)]),
                                    ("wandb", sorted((int(r["checkpoint_step"]), r[key]) for r in rows if key in r))):
                assert [step for step, _ in points] == list(STEPS), (tracker, key, points)
                for (step, value), (_, reference) in zip(points, expected, strict=True):
                    assert value == pytest.approx(reference, rel=1e-5), (tracker, key, step)

    # The best value's summary key names the suite version like its metric keys (README, `watch.best.suite`).
    summary, tags = wandb_summary(out), mlflow_run(mlflow_server.url, experiment).data.tags
    for version, label in labels.items():
        lowest = min(want[step][version]["loss"] for step in STEPS)
        assert summary[f"best_{label}/loss"] == pytest.approx(lowest, rel=1e-5), summary
        assert float(tags[f"tracker_eval.summary.best_{label}/loss"]) == pytest.approx(lowest, rel=1e-5), tags
    assert "best_loss" not in summary

    # status: the configured suite shows the new numbers, the earlier version stays listed.
    doc = status_json(changed)
    assert doc["suites"] == ["val", "val-v1"]
    for row in doc["steps"]:
        assert row["suites"]["val"]["state"] == "delivered"
        for name, version in (("val", 2), ("val-v1", 1)):
            metrics = row["suites"][name]["metrics"]
            assert metrics["loss"] == pytest.approx(want[row["step"]][version]["loss"], rel=1e-5)

    # `tracker-eval eval` (no ledger of its own) sends a new step under the keys the watcher uses.
    publish(source_checkpoints, tmp_path / "ckpts", 60)
    done = subprocess.run([EXE, "eval", "--config", str(changed), "--step", "60"], capture_output=True, text=True,
                          timeout=300, env=child_env())
    assert done.returncode == 0, done.stderr
    reference = val_references(tmp_path / "ckpts", 60)[2]["loss"]
    (line,) = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] == 60]
    assert line.get("suite_version") == 2 and line["metrics"]["loss"] == pytest.approx(reference, rel=1e-5)
    history = mlflow_points(mlflow_server.url, experiment)
    assert [step for step, _ in sorted(history["eval/val-v2/loss"])] == [*STEPS, 60]
    assert [step for step, _ in sorted(history["eval/val/loss"])] == list(STEPS)


def _harness_config(tmp_path: pathlib.Path, options: dict[str, Any], name: str) -> Any:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "checkpoint_dir": str(tmp_path / "ckpts"), "model": "tracker_eval.tasks.classification:make_model",
        "output_dir": str(tmp_path / "out"), "loggers": [{"type": "jsonl"}],
        "suites": {"harness": {"kind": "lm_harness", "tasks": ["pydoc_cloze"], **options}},
    }))
    return load_config(path)


def _earlier_rule(config: Any, options: dict[str, Any]) -> str:
    """The stream hash the previous release gave a harness suite: its raw options (bar batch_size)."""
    raw = {k: v for k, v in {"tasks": ["pydoc_cloze"], **options}.items() if k != "batch_size"}
    blob = json.dumps({"run": run_hash(config), "suite": "harness", "kind": "lm_harness", "options": raw},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def test_restating_a_default_or_packing_keeps_a_plugin_suite_s_stream_and_an_earlier_stream_is_adopted(
        tmp_path, ledger_backend):
    plain = _harness_config(tmp_path, {}, "plain")
    same = {name: _harness_config(tmp_path, options, name) for name, options in {
        "max_length": {"max_length": 512}, "packing": {"packing": True}, "batch": {"batch_size": 8},
        "seed": {"fewshot_seed": 1234, "bootstrap_iters": 1000}}.items()}
    for name, config in same.items():
        assert suite_hash(config, "harness") == suite_hash(plain, "harness"), name
    for options in ({"max_length": 256}, {"limit": 5}, {"num_fewshot": 1}):
        assert suite_hash(_harness_config(tmp_path, options, "other"), "harness") != suite_hash(plain, "harness")

    # A ledger written by the previous release under the raw-options hash, with `packing: true`.
    options = {"packing": True, "max_length": 512}
    config = _harness_config(tmp_path, options, "old")
    earlier = _earlier_rule(config, options)
    assert earlier_suite_hashes(config, "harness") == (earlier,)
    result = EvalResult(step=20, checkpoint="/c/20", metrics={"acc": 0.25}, suite="harness")
    with Ledger(config.output_dir, checkpoint_dir=config.checkpoint_dir, config_hash=earlier,
                run_hash=run_hash(config), suite="harness", loggers=["jsonl"], url=ledger_backend) as old:
        old.register([20])
        assert old.claim(20, owner="a")
        old.record_metrics(result, owner="a")
    # Today's rule gives another hash; opening the suite's ledger takes the earlier stream over.
    assert suite_hash(config, "harness") != earlier
    with open_ledger(config, loggers=["jsonl"], suite="harness") as ledger:
        assert ledger.steps() == [20] and ledger.result(20).metrics == {"acc": 0.25}
        assert ledger.suite_version == 1
    with open_ledger(plain, loggers=["jsonl"], suite="harness") as ledger:  # the same stream, spelled plainly
        assert ledger.steps() == [20] and ledger.suite_version == 1


def test_versions_count_in_the_order_the_ledger_saw_them_and_results_carry_theirs(tmp_path, ledger_url):
    def opened(config_hash: str) -> Ledger:
        return Ledger(tmp_path, checkpoint_dir="/c", config_hash=config_hash, run_hash="run", suite="val",
                      url=ledger_url)

    for config_hash, version in (("a", 1), ("b", 2), ("a", 1), ("c", 3), ("b", 2)):
        with opened(config_hash) as ledger:
            assert ledger.suite_version == version, config_hash
    with Ledger(tmp_path, checkpoint_dir="/c", config_hash="t", run_hash="run", suite="test",
                url=ledger_url) as ledger:
        assert ledger.suite_version == 1  # versions count per suite name
    with opened("b") as ledger:
        ledger.register([20])
        assert ledger.claim(20, owner="a")
        ledger.record_metrics(EvalResult(step=20, checkpoint="/c/20", metrics={"loss": 1.0}, suite="val"),
                              owner="a")
        stored = ledger.result(20)
    assert stored.suite_version == 2
    assert stored.to_json()["suite_version"] == 2
    assert EvalResult.from_json(stored.to_json()).suite_version == 2
    # `tracker-eval eval` (no ledger of its own) reads the same versions without writing.
    versions = read_suite_versions(tmp_path, checkpoint_dir="/c", run_hash="run", url=ledger_url,
                                   suites={"val": ("b",), "test": ("t",), "new": ("x",), "old": ("z", "a")})
    assert versions == {"val": 2, "test": 1, "new": 1, "old": 1}
    assert read_suite_versions(tmp_path, checkpoint_dir="/c", run_hash="run", suites={"val": ("z",)},
                               url=ledger_url) == {"val": 4}
    assert (tmp_path / "ledger.sqlite").exists() == (ledger_url is None)


def test_the_readme_documents_the_best_value_key_the_trackers_get():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert best_key("", "loss") == "best_loss" and "`best_<metric>`" in readme
    assert best_key("val", "loss") == "best_val/loss" and "`best_<suite>/<metric>`" in readme
    for tracker in ("### `wandb`", "### `mlflow`", "### `tensorboard`"):
        section = readme.split(tracker, 1)[1].split("\n### ", 1)[0]
        assert "best_<suite>/<metric>" in section, tracker  # each tracker's section says it with suites


def test_a_version_4_ledger_sends_a_changed_suite_s_results_again_under_its_version_keys(tmp_path):
    """Before versions, a changed suite's results were acknowledged by loggers that skipped them (the
    step and suite were held already); the migration queues them again, for the `-vN` keys."""
    path = tmp_path / "ledger.sqlite"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    for version in range(1, 5):
        for statement in _MIGRATIONS[version].split(";"):
            if statement.strip():
                raw.execute(statement)
    raw.execute("PRAGMA user_version = 4")
    raw.executemany("INSERT INTO streams (stream_id, checkpoint_dir, config_hash, parent_id, suite) "
                    "VALUES (?, '/c', ?, ?, ?)",
                    [(1, "run", None, None), (2, "val1", 1, "val"), (3, "val2", 1, "val"), (4, "test", 1, "test"),
                     (5, "plain", None, None)])
    for stream in (2, 3, 4, 5):
        result = EvalResult(step=20, checkpoint="/c/20", metrics={"loss": float(stream)})
        raw.execute("INSERT INTO steps (stream_id, step, state, attempts, result_json, updated_at) "
                    "VALUES (?, 20, 'delivered', 1, ?, 5.0)", (stream, encode_result(result)))
        raw.execute("INSERT INTO outbox (stream_id, step, logger, state, attempts, next_attempt_at, delivered_at) "
                    "VALUES (?, 20, 'jsonl', 'delivered', 1, 5.0, 6.0)", (stream,))
    raw.close()

    def opened(config_hash: str, name: str) -> Ledger:
        return Ledger(tmp_path, checkpoint_dir="/c", config_hash=config_hash, run_hash="run", suite=name,
                      loggers=["jsonl"])

    with opened("val2", "val") as ledger:
        assert ledger.suite_version == 2
        assert ledger.pending_deliveries("jsonl") and ledger.rows()[0]["deliveries"] == {"jsonl": "pending"}
        assert ledger.result(20).suite_version == 2 and ledger.result(20).metrics == {"loss": 3.0}
    for config_hash, name in (("val1", "val"), ("test", "test")):
        with opened(config_hash, name) as ledger:  # first versions were delivered under their own keys
            assert ledger.rows()[0]["state"] == "delivered" and not ledger.pending_deliveries("jsonl")
    with Ledger(tmp_path, checkpoint_dir="/c", config_hash="plain", loggers=["jsonl"]) as ledger:
        assert ledger.rows()[0]["state"] == "delivered"
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_existing_streams_keep_their_hashes(tmp_path):
    """The previous release's formulas, written out: configs without suites and eval suites keep
    their ledger streams and tracker runs."""
    common = {"checkpoint_dir": str(tmp_path / "ckpts"), "model": "m:f", "output_dir": str(tmp_path / "out")}
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({**common, "eval_function": "e:f", "data": "d:f", "batch_size": 8,
                                "data_kwargs": {"limit": 3}}))
    plain = load_config(path)
    checkpoint = {"item": None, "params": "params", "mutable": []}
    assert stream_hash(plain) == run_hash(plain) == _sha({
        "model": "m:f", "eval_function": "e:f", "data": "d:f", "split": "validation", "checkpoint": checkpoint,
        "finalize": None, "model_kwargs": {}, "data_kwargs": {"limit": 3}, "seed": 0})
    path.write_text(json.dumps({**common, "suites": {"val": {"eval_function": "e:f", "data": "d:f", "batch_size": 8}}}))
    suites = load_config(path)
    run = _sha({"model": "m:f", "model_kwargs": {}, "checkpoint": checkpoint, "seed": 0})
    assert run_hash(suites) == run
    assert suite_hash(suites, "val") == _sha({"run": run, "suite": "val", "kind": "eval", "options": {
        "eval_function": "e:f", "data": "d:f", "split": "validation", "finalize": None, "data_kwargs": {}}})
    assert earlier_suite_hashes(suites, "val") == ()
