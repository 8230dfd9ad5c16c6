"""A cadence per suite: `val` on every checkpoint and `test` on every_n_steps, one restore per step,
skips shown by `status` with their reason, a later cadence applying from then on, and
`tracker-eval retry --skipped` asking for a skipped step."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from test_suites import TEST, VAL, jsonl_by_suite, references, run_watch, status_json, write_suites_config
from watcher_harness import EXE, child_env, publish

from tracker_eval.config import load_config
from tracker_eval.errors import ConfigError

pytest_plugins = ["watcher_harness", "fixtures_postgres", "ledger_backends"]


def _suites(test_policy: Any) -> dict[str, Any]:
    return {"val": VAL, "test": {**TEST, "policy": test_policy}}


def _evaluating(text: str, step: int) -> list[str]:
    """The watcher's "evaluating step N ..." lines for `step` (one per restore of it)."""
    return [line.strip() for line in text.splitlines() if f"evaluating step {step} " in line + " "]


def test_val_every_checkpoint_test_every_40_then_a_new_cadence_and_a_skipped_step_asked_for(
        tmp_path, source_checkpoints, ledger_backend):
    ckpts = tmp_path / "ckpts"
    for step in (20, 40, 60):
        publish(source_checkpoints, ckpts, step)
    first = write_suites_config(tmp_path, _suites({"every_n_steps": 40}), loggers=[{"type": "jsonl"}],
                                watch={"until_step": 60}, name="first.yaml")
    watcher = run_watch(first)
    # One restore per step; `test` only where its cadence wants it.
    assert _evaluating(watcher.text, 20)[0].endswith("evaluating step 20 (suite val)"), watcher.tail()
    assert _evaluating(watcher.text, 40)[0].endswith("evaluating step 40 (suites val, test)"), watcher.tail()
    assert _evaluating(watcher.text, 60)[0].endswith("evaluating step 60 (suite val)"), watcher.tail()
    assert [len(_evaluating(watcher.text, s)) for s in (20, 40, 60)] == [1, 1, 1], watcher.tail()

    doc = status_json(first)
    assert doc["policies"] == {"val": "all", "test": "every 40 steps"}
    by_step = {row["step"]: row["suites"] for row in doc["steps"]}
    for step in (20, 60):
        assert by_step[step]["val"]["state"] == "delivered"
        assert by_step[step]["test"]["state"] == "skipped"
        assert by_step[step]["test"]["reason"] == "policy every_n_steps=40: not a multiple of 40"
        assert by_step[step]["test"]["attempts"] == 0
    assert by_step[40]["test"]["state"] == "delivered"
    table = subprocess.run([EXE, "status", "--config", str(first)], capture_output=True, text=True, timeout=120,
                           env=child_env())
    assert table.returncode == 0, table.stderr
    assert "skipped (policy every_n_steps=40" in table.stdout and "policies: val: all, test: every 40 steps" \
        in table.stdout, table.stdout

    # A new cadence (every 50) keeps the suite's stream; step 20 is asked for although every 50 skips it.
    second = write_suites_config(tmp_path, _suites({"every_n_steps": 50}), loggers=[{"type": "jsonl"}],
                                 watch={"until_step": 100}, name="second.yaml")
    asked = subprocess.run([EXE, "retry", "--config", str(second), "--skipped", "--step", "20", "--suite", "test"],
                           capture_output=True, text=True, timeout=120, env=child_env())
    assert asked.returncode == 0, asked.stderr
    assert "asked for 1 skipped step of step 20 in suite 'test': step 20 (test)" in asked.stdout, asked.stdout
    for step in (80, 100):
        publish(source_checkpoints, ckpts, step)
    watcher = run_watch(second)
    assert [line.split("evaluating ")[1] for line in watcher.text.splitlines() if "evaluating step" in line] == [
        "step 20 (suite test)", "step 80 (suite val)", "step 100 (suites val, test)"], watcher.tail()

    doc = status_json(second)
    by_step = {row["step"]: row["suites"] for row in doc["steps"]}
    assert by_step[60]["test"]["state"] == "skipped"  # skipped before stays skipped under the new cadence
    assert by_step[80]["test"]["reason"] == "policy every_n_steps=50: not a multiple of 50"
    want = {step: references(ckpts, step) for step in (20, 40, 100)}
    jsonl = jsonl_by_suite(tmp_path / "out")
    assert sorted(s for s, name in jsonl if name == "test") == [20, 40, 100]
    assert sorted(s for s, name in jsonl if name == "val") == [20, 40, 60, 80, 100]
    for step in (20, 40, 100):
        assert by_step[step]["test"]["state"] == "delivered"
        (line,) = jsonl[(step, "test")]
        assert line["loss"] == pytest.approx(want[step]["test"]["loss"], rel=1e-5)
        assert line["accuracy"] == pytest.approx(want[step]["test"]["accuracy"], rel=1e-9)


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"every_n_steps": 0}, "suites.test.policy {'every_n_steps': 0} is not valid; use all, latest or "
                               "{every_n_steps: N} with N >= 1"),
        ("newest", "suites.test.policy 'newest' is not valid"),
    ],
)
def test_a_bad_suite_policy_is_one_line_naming_the_suite(tmp_path, policy, message):
    path = write_suites_config(tmp_path, _suites(policy), loggers=[{"type": "jsonl"}])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_retry_skipped_usage_errors_exit_2(tmp_path):
    path = write_suites_config(tmp_path, _suites("all"), loggers=[{"type": "jsonl"}])
    done = subprocess.run([EXE, "retry", "--config", str(path), "--skipped", "--suite", "tset"], capture_output=True,
                          text=True, timeout=120, env=child_env())
    assert done.returncode == 2
    assert done.stderr == "tracker-eval: error: --suite 'tset' is not a suite of this config; suites: val, test\n"
    done = subprocess.run([EXE, "retry", "--config", str(path), "--suite", "val"], capture_output=True, text=True,
                          timeout=120, env=child_env())
    assert done.returncode == 2
    assert done.stderr == "tracker-eval: error: --suite applies with --skipped; add --skipped or leave --suite out\n"
