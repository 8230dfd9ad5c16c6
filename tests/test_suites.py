"""Evaluation suites: several evaluations per checkpoint after one restore, each its own ledger
stream, delivered once per (step, suite); a suite added later evaluates only itself on old steps."""

from __future__ import annotations

import collections
import json
import pathlib
import subprocess
import uuid
from typing import Any

import numpy as np
import pytest
from watcher_harness import (
    CLASSIFICATION,
    EXE,
    WatcherProcess,
    child_env,
    mlflow_points,
    publish,
    wandb_rows,
)

from tracker_eval.config import load_config
from tracker_eval.errors import ConfigError
from tracker_eval.identity import run_hash, stream_hash, suite_hash
from tracker_eval.loggers.jsonl import read_jsonl

pytest_plugins = ["fixtures_mlflow", "watcher_harness", "fixtures_postgres", "ledger_backends"]

STEPS = (20, 40)
TRAIN_LIMIT = 200  # the `test` suite: the first 200 training examples, another set than `val`


def suite(**extra: Any) -> dict[str, Any]:
    return {"eval_function": f"{CLASSIFICATION}:eval_function", "data": f"{CLASSIFICATION}:make_eval_data", **extra}


VAL = suite(batch_size=64)
TEST = suite(batch_size=48, split="train", data_kwargs={"limit": TRAIN_LIMIT})
BROKEN = suite(batch_size=64, data_kwargs={"no_such_option": 1})  # the factory raises TypeError


def write_suites_config(root: pathlib.Path, suites: dict[str, Any], *, loggers: list[dict[str, Any]],
                        watch: dict[str, Any] | None = None, name: str = "watch.yaml") -> pathlib.Path:
    config = {
        "checkpoint_dir": str(root / "ckpts"),
        "model": f"{CLASSIFICATION}:make_model",
        "output_dir": str(root / "out"),
        "suites": suites,
        "loggers": loggers,
        "watch": {"poll_interval_s": 0.3, "until_step": STEPS[-1], "idle_timeout_s": 120, **(watch or {})},
    }
    path = root / name
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def references(checkpoint_dir: pathlib.Path, step: int) -> dict[str, dict[str, float]]:
    """Float64 numpy metrics of both suites' data at `step` (a plain Orbax restore of the whole state)."""
    from reference import mlp_losses, restored_params  # noqa: PLC0415

    from tracker_eval.tasks.classification import split_digits  # noqa: PLC0415 - the data only

    params = restored_params(checkpoint_dir, step)
    out = {}
    for name, (split, limit) in {"val": ("validation", None), "test": ("train", TRAIN_LIMIT)}.items():
        x, y = split_digits(split)
        losses, correct = mlp_losses(params, x[:limit], y[:limit])
        out[name] = {"loss": float(np.mean(losses)), "accuracy": float(np.mean(correct))}
    return out


def run_watch(config: pathlib.Path) -> WatcherProcess:
    with WatcherProcess(config) as watcher:
        code = watcher.wait_exit(timeout=300)
    assert code == 0, watcher.tail()
    return watcher


def status_json(config: pathlib.Path) -> dict[str, Any]:
    done = subprocess.run([EXE, "status", "--config", str(config), "--json"], capture_output=True, text=True,
                          timeout=120, env=child_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def jsonl_by_suite(out: pathlib.Path) -> dict[tuple[int, str], list[dict[str, float]]]:
    found = collections.defaultdict(list)
    for record in read_jsonl(out / "metrics.jsonl"):
        found[(record["step"], record.get("suite", ""))].append(record["metrics"])
    return dict(found)


def test_two_suites_one_restore_each_step_and_suite_delivered_once(tmp_path, source_checkpoints, mlflow_server,
                                                                   ledger_backend):
    experiment = f"suites-{uuid.uuid4().hex[:8]}"
    loggers = [{"type": "jsonl"}, {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment},
               {"type": "wandb"}]
    config = write_suites_config(tmp_path, {"val": VAL, "test": TEST}, loggers=loggers,
                                 watch={"best": {"suite": "test", "metric": "loss", "mode": "min"}})
    for step in STEPS:
        publish(source_checkpoints, tmp_path / "ckpts", step)
    watcher = run_watch(config)
    out = tmp_path / "out"
    # One evaluation decision (one restore) per step, covering both suites.
    assert watcher.text.count("evaluating step 20 (suites val, test)") == 1, watcher.tail()
    assert watcher.text.count("evaluating step 40 (suites val, test)") == 1, watcher.tail()
    want = {step: references(tmp_path / "ckpts", step) for step in STEPS}

    jsonl = jsonl_by_suite(out)
    assert sorted(jsonl) == sorted((step, name) for step in STEPS for name in ("val", "test"))
    for (step, name), lines in jsonl.items():
        assert len(lines) == 1, (step, name)
        assert lines[0]["loss"] == pytest.approx(want[step][name]["loss"], rel=1e-5)
        assert lines[0]["accuracy"] == pytest.approx(want[step][name]["accuracy"], rel=1e-9)

    history = mlflow_points(mlflow_server.url, experiment)
    for name in ("val", "test"):
        for metric in ("loss", "accuracy"):
            points = history[f"eval/{name}/{metric}"]
            assert sorted(step for step, _ in points) == list(STEPS), (name, metric, points)
            for step, value in points:
                assert value == pytest.approx(want[step][name][metric], rel=1e-5)
    assert not any(key in history for key in ("eval/loss", "eval/accuracy"))

    rows = [r for r in wandb_rows(out) if "checkpoint_step" in r]
    seen = collections.Counter()
    for row in rows:
        suites = {key.split("/")[1] for key in row if key.startswith("eval/")}
        assert len(suites) == 1, row  # one row per (step, suite)
        (name,) = suites
        seen[(int(row["checkpoint_step"]), name)] += 1
        assert row[f"eval/{name}/loss"] == pytest.approx(want[int(row["checkpoint_step"])][name]["loss"], rel=1e-5)
    assert seen == {(step, name): 1 for step in STEPS for name in ("val", "test")}

    doc = status_json(config)
    assert doc["suites"] == ["val", "test"]
    assert [row["step"] for row in doc["steps"]] == list(STEPS)
    for row in doc["steps"]:
        assert row["state"] == "delivered"
        for name in ("val", "test"):
            entry = row["suites"][name]
            assert entry["state"] == "delivered" and entry["reason"] is None
            assert entry["deliveries"] == {"jsonl": "delivered", "mlflow": "delivered", "wandb": "delivered"}
            assert entry["metrics"]["loss"] == pytest.approx(want[row["step"]][name]["loss"], rel=1e-5)
    best_step = min(STEPS, key=lambda s: want[s]["test"]["loss"])
    assert doc["best"]["suite"] == "test" and doc["best"]["step"] == best_step
    best = json.loads((out / "best.json").read_text())
    assert best["suite"] == "test" and best["step"] == best_step
    assert (out / "ledger.sqlite").exists() == (ledger_backend is None)


def test_a_suite_added_later_evaluates_only_itself_and_a_failing_suite_does_not_stop_the_others(
    tmp_path, source_checkpoints, mlflow_server, ledger_backend
):
    experiment = f"suites-later-{uuid.uuid4().hex[:8]}"
    loggers = [{"type": "jsonl"}, {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment}]
    for step in STEPS:
        publish(source_checkpoints, tmp_path / "ckpts", step)
    first = write_suites_config(tmp_path, {"val": VAL}, loggers=loggers, name="first.yaml")
    run_watch(first)
    out = tmp_path / "out"
    assert sorted(jsonl_by_suite(out)) == [(step, "val") for step in STEPS]

    # Later: `test` and a broken suite join; `val` has every step done and must not run again.
    second = write_suites_config(tmp_path, {"val": VAL, "test": TEST, "broken": BROKEN}, loggers=loggers,
                                 watch={"max_attempts": 1}, name="second.yaml")
    watcher = run_watch(second)
    assert "suites val" not in watcher.text and "suite 'val'" not in watcher.text, watcher.tail()
    assert watcher.text.count("evaluating step 20 (suites test, broken)") == 1, watcher.tail()
    want = {step: references(tmp_path / "ckpts", step) for step in STEPS}
    jsonl = jsonl_by_suite(out)
    assert sorted(jsonl) == sorted((step, name) for step in STEPS for name in ("val", "test"))
    assert all(len(lines) == 1 for lines in jsonl.values()), jsonl
    for step in STEPS:
        assert jsonl[(step, "test")][0]["loss"] == pytest.approx(want[step]["test"]["loss"], rel=1e-5)
    history = mlflow_points(mlflow_server.url, experiment)
    for name in ("val", "test"):
        assert sorted(step for step, _ in history[f"eval/{name}/loss"]) == list(STEPS), history
    assert not any(key.startswith("eval/broken/") for key in history)

    doc = status_json(second)
    for row in doc["steps"]:
        assert row["suites"]["val"]["state"] == "delivered"
        assert row["suites"]["test"]["state"] == "delivered"
        broken = row["suites"]["broken"]
        assert broken["state"] == "given_up" and "TypeError" in broken["reason"] and not broken["metrics"]

    # Removing suites keeps their history in the ledger and in status.
    doc = status_json(first)
    assert doc["suites"] == ["val", "test", "broken"]
    for row in doc["steps"]:
        assert row["state"] == "delivered"  # over the configured suite only
        assert row["suites"]["test"]["metrics"]["loss"] == pytest.approx(want[row["step"]]["test"]["loss"], rel=1e-5)
    assert (out / "ledger.sqlite").exists() == (ledger_backend is None)


def test_one_restore_per_checkpoint_and_one_compile_per_suite(tmp_path, source_checkpoints):
    from tracker_eval.runners.pipeline import Pipeline  # noqa: PLC0415

    for step in STEPS:
        publish(source_checkpoints, tmp_path / "ckpts", step)
    config = load_config(write_suites_config(tmp_path, {"val": VAL, "test": TEST, "broken": BROKEN},
                                             loggers=[]))
    pipeline = Pipeline(config)
    outcomes = [pipeline.evaluate_suites(step) for step in STEPS]
    assert pipeline.restores == len(STEPS)
    assert pipeline.suites["val"].evaluation.trace_count == 1
    assert pipeline.suites["test"].evaluation.trace_count == 1
    for step, outcome in zip(STEPS, outcomes, strict=True):
        assert isinstance(outcome["broken"], TypeError)
        want = references(tmp_path / "ckpts", step)
        for name in ("val", "test"):
            result = outcome[name]
            assert result.suite == name and result.step == step
            assert result.metrics["loss"] == pytest.approx(want[name]["loss"], rel=1e-5)
            assert result.metrics["accuracy"] == pytest.approx(want[name]["accuracy"], rel=1e-9)
    assert list(pipeline.evaluate_suites(STEPS[0], suites=["test"])) == ["test"]


BASE = {"checkpoint_dir": "/ckpt", "model": f"{CLASSIFICATION}:make_model"}


ONE = "  val: {data: a, eval_function: b, batch_size: 8}\n"
TWO = ONE + "  test: {data: a, eval_function: b, batch_size: 8}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("suites:\n  Val: {data: a, eval_function: b, batch_size: 8}\n",
         "suite name 'Val' is not valid; use lowercase letters, digits and _ ([a-z0-9_]+)"),
        ("suites:\n" + ONE + ONE,
         "key 'val' appears twice in one mapping (line 5); each key, and each suite name under suites, "
         "may appear once"),
        ("suites:\n  val: {eval_function: b, batch_size: 8}\n", "suites.val.data is required; set it under suites.val"),
        ("batch_size: 8\nsuites:\n" + ONE,
         "batch_size is a suite option when suites are set; move it under each suite (suites.<name>.batch_size) "
         "or remove suites"),
        ("suites:\n" + TWO + "watch: {best: {metric: loss}}\n",
         "watch.best.suite is required with several suites; set it to one of val, test"),
        ("suites:\n" + ONE + "watch: {best: {suite: tset, metric: loss}}\n",
         "watch.best.suite 'tset' is not a suite of this config; it must be one of val"),
    ],
)
def test_suite_config_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint_dir: /ckpt\nmodel: m:f\n" + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).endswith(message), str(info.value)


def test_a_config_error_exits_2_with_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint_dir: /ckpt\nmodel: m:f\nsuites:\n  val: {eval_function: b, batch_size: 8}\n")
    done = subprocess.run([EXE, "status", "--config", str(path)], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert done.returncode == 2
    assert done.stderr == "tracker-eval: error: suites.val.data is required; set it under suites.val\n"
    path.write_text("checkpoint_dir: /ckpt\nmodel: m:f\nsuites:\n" + TWO)
    done = subprocess.run([EXE, "eval", "--config", str(path), "--suite", "val", "--suite", "tset"],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert done.returncode == 2
    assert done.stderr == "tracker-eval: error: --suite 'tset' is not a suite of this config; suites: val, test\n"


def test_without_suites_the_stream_and_run_identity_are_unchanged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({**BASE, "eval_function": "e:f", "data": "d:f", "batch_size": 8}))
    config = load_config(path)
    assert [s.name for s in config.suite_list()] == [""]
    assert run_hash(config) == suite_hash(config, "") == stream_hash(config)
    assert "suites" not in config.to_dict()


def test_two_processes_one_suite_failing_on_one_process_the_next_suite_runs_on_both(tmp_path, source_checkpoints):
    """Process 1's data of suite `flaky` raises mid-way: both processes abandon that suite (none waits
    in a collective), then both evaluate `val` on the same restored params and agree with float64."""
    import socket  # noqa: PLC0415

    publish(source_checkpoints, tmp_path / "ckpts", STEPS[0])
    flaky = suite(batch_size=40, data="flaky_data:make_eval_data", data_kwargs={"marker": str(tmp_path / "m")})
    config = write_suites_config(tmp_path, {"flaky": flaky, "val": VAL}, loggers=[{"type": "jsonl"}])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    output = tmp_path / "result.json"
    procs = [subprocess.Popen(
        [EXE, "eval", "--config", str(config), "--output", str(output),
         f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}", "distributed.initialization_timeout_s=60"],
        env=child_env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=240))
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [1, 1], outs  # a suite failed: exit 1, the other delivered
    assert "suite 'flaky' failed: PeerFailedError: process 1: OSError" in outs[0][1]
    assert "suite 'flaky' failed: OSError: shard 2 of host 1" in outs[1][1]
    want = references(tmp_path / "ckpts", STEPS[0])["val"]
    payload = json.loads(output.read_text())
    assert payload["step"] == STEPS[0] and set(payload["metrics"]) >= {"val/loss", "val/accuracy"}
    assert not any(key.startswith("flaky/") for key in payload["metrics"])
    assert payload["metrics"]["val/loss"] == pytest.approx(want["loss"], rel=1e-5)
    marker = "tracker-eval: process 1: step 20 suite 'val' reduced metrics "
    line = next(line for line in outs[1][1].splitlines() if line.startswith(marker))
    follower = json.loads(line[len(marker):])
    assert follower["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert follower["accuracy"] == pytest.approx(want["accuracy"], abs=1e-7)
    records = [r for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")]
    assert [(r["step"], r["suite"]) for r in records] == [(STEPS[0], "val")]


def test_the_lm_harness_kind_loads_through_its_entry_point_and_runs_beside_an_eval_suite(tmp_path):
    """`kind: lm_harness` is found in the entry-point group and run on the same live params as an
    eval suite; its metrics equal the plug-in used directly on those params, under its suite's keys."""
    from tracker_eval_lm_harness.suite import HarnessSuite  # noqa: PLC0415

    from tracker_eval.evaluation.state import EvalState  # noqa: PLC0415
    from tracker_eval.runners.pipeline import Pipeline  # noqa: PLC0415
    from tracker_eval.runners.suites import PluginSuite  # noqa: PLC0415
    from tracker_eval.tasks import language_model as lm  # noqa: PLC0415

    harness = {"kind": "lm_harness", "tasks": ["pydoc_cloze"], "limit": 8, "max_length": 64, "batch_size": 8,
               "bootstrap_iters": 0, "num_fewshot": 0}
    text = {"eval_function": "tracker_eval.tasks.language_model:eval_function",
            "data": "tracker_eval.tasks.language_model:make_eval_data", "batch_size": 8,
            "data_kwargs": {"seq_len": 32}}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"checkpoint_dir": str(tmp_path / "ckpts"), "output_dir": str(tmp_path / "out"),
                                "model": "tracker_eval.tasks.language_model:make_model",
                                "suites": {"text": text, "harness": harness}}))
    config = load_config(path)
    pipeline = Pipeline(config, progress=False)
    assert isinstance(pipeline.suites["harness"], PluginSuite)
    params = lm.init_params(lm.make_model(), seed=3)
    state = EvalState.create(apply_fn=None, params=params, step=7)
    outcomes = pipeline.evaluate_state_suites(state, checkpoint="live")
    assert list(outcomes) == ["text", "harness"]
    result = outcomes["harness"]
    assert not isinstance(result, Exception), result
    assert result.suite == "harness" and result.step == 7 and result.checkpoint == "live"
    assert result.provenance["eval_wall_s"] > 0  # the watcher's "evaluated in" line reads it
    direct = HarnessSuite(HarnessSuite.Config.from_mapping({k: v for k, v in harness.items() if k != "kind"}),
                          adapter=pipeline.adapter, mesh=pipeline.mesh, name="direct")
    try:
        direct_out = direct.run(params, step=7)
    finally:
        direct.close()
    want = direct_out.metrics
    assert set(result.metrics) == set(want) and "pydoc_cloze/acc" in want
    # lm-eval's per-sample records travel with the suite's result (stored, then logged by trackers).
    assert list(result.samples) == ["pydoc_cloze"] and len(result.samples["pydoc_cloze"]) == 8
    assert [(r["doc_id"], r["arguments"]) for r in result.samples["pydoc_cloze"]] == [
        (r["doc_id"], r["arguments"]) for r in direct_out.samples["pydoc_cloze"]]
    assert result.metrics == pytest.approx(want, rel=1e-9)
    assert not isinstance(outcomes["text"], Exception) and "loss" in outcomes["text"].metrics
    pipeline.close()


def _suite_result(step: int, name: str, loss: float) -> Any:
    from tracker_eval.evaluation.result import EvalResult  # noqa: PLC0415

    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": loss}, suite=name,
                      per_example={"example_loss": np.array([loss, loss + 1.0])})


def test_jsonl_and_tensorboard_hold_each_step_and_suite_once_through_resends_and_a_restart(tmp_path):
    """Two suites of one step are two results: both written; a resend of either (also by a new
    logger instance, as after a crash) adds nothing."""
    from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
    from tracker_eval_tensorboard.logger import TensorboardLogger  # noqa: PLC0415

    from tracker_eval.loggers.base import LoggerContext  # noqa: PLC0415
    from tracker_eval.loggers.jsonl import JsonlLogger  # noqa: PLC0415

    context = LoggerContext(output_dir=str(tmp_path), run_key="stream@suites")
    sent = [_suite_result(10, "val", 0.5), _suite_result(10, "test", 0.75), _suite_result(20, "val", 0.25)]
    for attempt in range(2):
        loggers = [JsonlLogger(context=context), TensorboardLogger(TensorboardLogger.Config(run_name="eval"),
                                                                   context=context, name="tensorboard")]
        for logger in loggers:
            if attempt and hasattr(logger, "reconcile"):  # TensorBoard reads its files again at every flush
                logger.reconcile({10: 0.0}, suite="test")
            for result in sent if attempt == 0 else [*sent, sent[1]]:
                logger.log_result(result)
            logger.flush()
            logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert sorted((r["step"], r["suite"], r["metrics"]["loss"]) for r in records) == [
        (10, "test", 0.75), (10, "val", 0.5), (20, "val", 0.25)]
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "eval")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/val/loss")] == [(10, 0.5), (20, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval/test/loss")] == [(10, 0.75)]
    assert "eval/test/per_example/example_loss" in events.Tags()["tensors"]


def test_in_training_evaluates_every_suite_on_the_live_params_and_records_each(tmp_path):
    from reference import mlp_losses  # noqa: PLC0415

    from tracker_eval import InTrainingEvaluation  # noqa: PLC0415
    from tracker_eval.ledger.steps import StepState  # noqa: PLC0415
    from tracker_eval.tasks.classification import split_digits  # noqa: PLC0415
    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    config = write_suites_config(tmp_path, {"val": VAL, "broken": BROKEN}, loggers=[{"type": "jsonl"}])
    got: dict[int, Any] = {}
    with InTrainingEvaluation.from_config(str(config)) as evaluation:

        def after_save(step, state):
            got[step] = (evaluation.after_checkpoint(step=step, train_state=state), state.params)

        train_classifier(tmp_path / "ckpts", steps=20, save_every=10, learning_rate=0.01, after_save=after_save)
        assert evaluation.compile_count == 1  # the val suite's step, once for the run
        ledgers = evaluation.stream.ledgers
        stored = (StepState.EVALUATED, StepState.DELIVERED)  # delivery runs on its own threads
        assert all(ledgers["val"].state(s) in stored for s in (10, 20))
        assert [ledgers["broken"].state(s) for s in (10, 20)] == [StepState.FAILED] * 2
        again = evaluation.after_checkpoint(step=10, params=got[10][1])  # stored: read back, not evaluated
        assert evaluation.compile_count == 1 and again["val"].metrics == got[10][0]["val"].metrics
    x, y = split_digits("validation")
    for step, (results, params) in got.items():
        assert list(results) == ["val"]  # the broken suite failed: left out, recorded, training went on
        losses, correct = mlp_losses(params, x, y)
        assert results["val"].metrics["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
        assert results["val"].suite == "val" and results["val"].step == step
    assert sorted((r["step"], r["suite"]) for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")) == [
        (10, "val"), (20, "val")]


def test_in_training_follows_each_suite_s_cadence_and_retry_skipped_brings_a_step_back(tmp_path):
    """`test` every 20 steps: step 10 evaluates `val` only and records `test` as skipped by policy,
    as a watcher would; step 20 evaluates both; a step asked for with `retry --skipped` is due again."""
    from reference import mlp_losses  # noqa: PLC0415

    from tracker_eval import InTrainingEvaluation  # noqa: PLC0415
    from tracker_eval.ledger.steps import StepState  # noqa: PLC0415
    from tracker_eval.tasks.classification import split_digits  # noqa: PLC0415
    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    suites = {"val": VAL, "test": {**TEST, "policy": {"every_n_steps": 20}}}
    config = write_suites_config(tmp_path, suites, loggers=[{"type": "jsonl"}])
    got: dict[int, Any] = {}
    with InTrainingEvaluation.from_config(str(config)) as evaluation:

        def after_save(step, state):
            got[step] = (evaluation.after_checkpoint(step=step, train_state=state), state.params)

        train_classifier(tmp_path / "ckpts", steps=20, save_every=10, learning_rate=0.01, after_save=after_save)
        test_ledger = evaluation.stream.ledgers["test"]
        assert test_ledger.state(10) == StepState.SKIPPED
        assert {r["step"]: r["reason"] for r in test_ledger.rows()}[10] == (
            "policy every_n_steps=20: not a multiple of 20")
        assert test_ledger.ask_for_skipped(10) == [10]
        again = evaluation.after_checkpoint(step=10, params=got[10][1])  # asked for: due now
        assert sorted(again) == ["test", "val"] and test_ledger.state(10) in (StepState.EVALUATED,
                                                                              StepState.DELIVERED)
    assert [sorted(got[step][0]) for step in (10, 20)] == [["val"], ["test", "val"]]
    for step, results in ((10, again), (20, got[20][0])):
        x, y = split_digits("train")
        losses, _ = mlp_losses(got[step][1], x[:TRAIN_LIMIT], y[:TRAIN_LIMIT])
        assert results["test"].metrics["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
