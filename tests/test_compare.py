"""`tracker-eval compare` and `gate` on a real watcher's ledger, every figure against scipy.stats.

The ledger is written by a real `tracker-eval watch` over real Orbax checkpoints of the digits
classifier, evaluated with a batch size (48) that leaves a ragged last batch of the 397 examples.
The reference reads the stored per-example `.npz` files directly and runs `scipy.stats.ttest_rel` and
`scipy.stats.binomtest` on them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from reference import restored_params, validation_metrics
from scipy import stats

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.identity import stream_hash
from tracker_eval.npz import read_npz

EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = (10, 20, 60)
REGRESSED = 70
ALERTS = [{"metric": "loss", "mode": "min", "against": "best", "p": 0.01},
          {"metric": "accuracy", "mode": "max", "against": "previous", "p": 0.01, "min_delta": 0.02}]
WATCH_OUTPUT: list[str] = []
REL = 1e-9


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A watcher's ledger of steps 10, 20 and 60 (config path, checkpoint dir)."""
    from tracker_eval.tasks.train import train_classifier

    root = tmp_path_factory.mktemp("compare")
    ckpts = root / "ckpts"
    train_classifier(ckpts, steps=60, save_every=10, learning_rate=0.05, save_steps=list(STEPS))
    shutil.copytree(ckpts / "10", ckpts / str(REGRESSED))  # a late checkpoint as bad as an early one
    config = root / "watch.yaml"
    config.write_text(json.dumps({
        "checkpoint_dir": str(ckpts), "output_dir": str(root / "out"),
        "model": "tracker_eval.tasks.classification:make_model",
        "eval_function": "tracker_eval.tasks.classification:eval_function",
        "data": "tracker_eval.tasks.classification:make_eval_data", "batch_size": 48,
        "loggers": [{"type": "jsonl"}, {"type": "console"}],
        "watch": {"poll_interval_s": 0.3, "until_step": REGRESSED, "idle_timeout_s": 120,
                  "best": {"metric": "loss", "mode": "min"}, "alerts": ALERTS},
    }))
    proc = _run("watch", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    WATCH_OUTPUT.append(proc.stdout + proc.stderr)
    return config, ckpts


def _stored(config: pathlib.Path, step: int) -> tuple[dict, dict]:
    """(metrics, per-example arrays) of a step, read straight from the ledger's row and .npz file."""
    out = json.loads(config.read_text())["output_dir"]
    with sqlite3.connect(os.path.join(out, "ledger.sqlite")) as conn:
        payload, arrays = conn.execute("SELECT result_json, arrays_path FROM steps WHERE step = ?", (step,)).fetchone()
    return json.loads(payload)["metrics"], read_npz(os.path.join(out, arrays))


def _close(got, want):
    if want is None or (isinstance(want, float) and math.isnan(want)):
        return got is None
    return got == pytest.approx(want, rel=REL, abs=1e-300)


def test_stderr_is_stored_beside_each_mean(watched):
    config, ckpts = watched
    metrics, arrays = _stored(config, 20)
    assert len(arrays["example_loss"]) == 397  # 8 full batches of 48 and a ragged one of 13
    losses, _ = validation_metrics(restored_params(ckpts, 20))  # independent float64 forward pass
    np.testing.assert_allclose(arrays["example_loss"], losses, rtol=1e-4, atol=1e-6)
    for name in ("loss", "accuracy"):
        values = arrays[f"example_{name}"].astype(np.float64)
        assert _close(metrics[f"{name}_stderr"], float(stats.sem(values))), name
    status = json.loads(_run("status", "--config", config, "--json").stdout)
    row = next(s for s in status["steps"] if s["step"] == 20)
    assert row["metrics"]["loss_stderr"] == metrics["loss_stderr"]


def test_compare_equals_scipy_on_the_stored_values(watched):
    config, _ = watched
    proc = _run("compare", "--config", config, 10, 60, "--json")
    assert proc.returncode == 0, proc.stderr
    got = {entry["metric"]: entry for entry in json.loads(proc.stdout)["metrics"]}
    assert set(got) == {"loss", "accuracy"}
    (_, a), (_, b) = _stored(config, 10), _stored(config, 60)
    for metric in ("loss", "accuracy"):
        first, second = a[f"example_{metric}"].astype(np.float64), b[f"example_{metric}"].astype(np.float64)
        test = stats.ttest_rel(second, first)
        interval = test.confidence_interval(0.95)
        entry = got[metric]
        assert entry["n"] == 397
        want = {"mean_a": first.mean(), "mean_b": second.mean(), "diff": (second - first).mean(),
                "stderr": stats.sem(second - first), "low": interval.low, "high": interval.high,
                "t": test.statistic, "p": test.pvalue}
        for key, value in want.items():
            assert _close(entry[key], float(value)), (metric, key, entry[key], value)
    only_a = int(np.sum((a["example_accuracy"] == 1) & (b["example_accuracy"] == 0)))
    only_b = int(np.sum((a["example_accuracy"] == 0) & (b["example_accuracy"] == 1)))
    assert got["accuracy"]["mcnemar"]["only_a"] == only_a and got["accuracy"]["mcnemar"]["only_b"] == only_b
    assert _close(got["accuracy"]["mcnemar"]["p"], stats.binomtest(only_b, only_a + only_b).pvalue)
    assert got["loss"]["mcnemar"] is None
    table = _run("compare", "--config", config, 10, 60)
    assert table.returncode == 0 and "95% interval" in table.stdout and "accuracy" in table.stdout


def test_a_step_against_itself_has_all_differences_zero(watched):
    config, _ = watched
    got = json.loads(_run("compare", "--config", config, 20, 20, "--json").stdout)["metrics"]
    for entry in got:
        assert (entry["diff"], entry["stderr"], entry["low"], entry["high"]) == (0, 0, 0, 0)
        assert entry["p"] is None and math.isnan(stats.ttest_rel([1.0, 2.0], [1.0, 2.0]).pvalue)
    assert next(e for e in got if e["metric"] == "accuracy")["mcnemar"] == {"only_a": 0, "only_b": 0, "p": 1.0}


def test_gate_exit_codes_and_best_with_its_uncertainty(watched):
    config, _ = watched
    (_, early), (_, late) = _stored(config, 10), _stored(config, 60)
    want_p = stats.ttest_rel(early["example_loss"].astype(np.float64), late["example_loss"].astype(np.float64)).pvalue
    assert want_p < 0.05  # 50 more steps of training lowered the loss clearly
    worse = _run("gate", "--config", config, "--step", 10, "--against", "best", "--metric", "loss")
    assert worse.returncode == 1, worse.stderr
    assert worse.stdout.startswith("fail: step 10 is significantly worse than step 60 on loss")
    assert f"p={want_p:.3g}" in worse.stdout
    accuracy = _run("gate", "--config", config, "--step", 10, "--against", 60, "--metric", "accuracy")
    assert accuracy.returncode == 1 and "(higher is better)" in accuracy.stdout  # the mode of its alert rule
    assert "McNemar p=" in accuracy.stdout
    better = _run("gate", "--config", config, "--step", 60, "--against", 10, "--metric", "loss")
    assert better.returncode == 0 and better.stdout.startswith("pass: step 60 is not significantly worse")
    for args, needle in [(("--against", 60, "--metric", "worst", "--mode", "min"), "'worst' has no per-example"),
                         (("--against", "best", "--metric", "worst", "--mode", "min"), "no stored result has 'worst'"),
                         (("--against", "best", "--metric", "worst"), "add --mode min"),
                         (("--against", "best", "--metric", "loss", "--p", "2"), "--p 2.0"),
                         (("--against", "last", "--metric", "loss"), "--against 'last'")]:
        proc = _run("gate", "--config", config, "--step", 10, *args)
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    # status and best.json: the best (60) against the runner-up by loss, with the paired p.
    status = json.loads(_run("status", "--config", config, "--json").stdout)
    losses = {s["step"]: s["metrics"]["loss"] for s in status["steps"]}
    runner_up = min((s for s in losses if s != 60), key=losses.get)
    _, ru = _stored(config, runner_up)
    p = stats.ttest_rel(late["example_loss"].astype(np.float64), ru["example_loss"].astype(np.float64)).pvalue
    best = status["best"]
    assert best["step"] == 60 and best["runner_up"]["step"] == runner_up
    assert _close(best["runner_up"]["p"], float(p)) and best["significant"] == bool(p < 0.05)
    best_file = json.loads((pathlib.Path(json.loads(config.read_text())["output_dir"]) / "best.json").read_text())
    assert best_file["runner_up"] == best["runner_up"] and best_file["significant"] == best["significant"]
    table = _run("status", "--config", config).stdout
    how = "significantly better than" if p < 0.05 else "not distinguishable from"
    assert f"best: step 60 (loss {losses[60]:.4g}), {how} step {runner_up} (p={p:.2g})" in table


def _ledger_config(tmp_path: pathlib.Path, sizes: dict[int, int]) -> pathlib.Path:
    from tracker_eval.config import load_config
    from tracker_eval.ledger.steps import Ledger

    (tmp_path / "ckpts").mkdir()
    path = tmp_path / "watch.yaml"
    path.write_text(json.dumps({
        "checkpoint_dir": str(tmp_path / "ckpts"), "output_dir": str(tmp_path / "out"),
        "model": "tracker_eval.tasks.classification:make_model",
        "eval_function": "tracker_eval.tasks.classification:eval_function",
        "data": "tracker_eval.tasks.classification:make_eval_data", "batch_size": 8,
        "loggers": [{"type": "jsonl"}]}))
    config = load_config(path)
    with Ledger(config.output_dir, checkpoint_dir=config.checkpoint_dir, config_hash=stream_hash(config),
                loggers=["jsonl"]) as ledger:
        for step, n in sizes.items():
            assert ledger.claim(step, owner="w")
            values = np.linspace(0.0, 1.0, n, dtype=np.float32) + step / 100
            assert ledger.record_metrics(EvalResult(step=step, checkpoint=str(step), metrics={"loss": values.mean()},
                                                    per_example={"example_loss": values}), owner="w")
    return path


def test_usage_errors_are_one_line_exit_2(tmp_path):
    config = _ledger_config(tmp_path, {10: 5, 20: 5, 30: 4})
    assert _run("compare", "--config", config, 10, 20).returncode == 0
    for args, needle in [((10, 30), "suite '' (the config's one evaluation): step 10 has 5 examples and step 30 has 4"),
                         ((10, 40), "step 40 has no stored result"),
                         ((10, 20, "--suite", "val"), "--suite 'val'")]:
        proc = _run("compare", "--config", config, *args)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = _run("compare", "--config", tmp_path / "watch.yaml", 1, 2, "output_dir=" + str(tmp_path / "none"))
    assert proc.returncode == 2 and "has no results" in proc.stderr


def test_harness_records_pair_by_document_not_position():
    """Per-sample records arrive in any order; pairing follows doc_id (and filter)."""
    from tracker_eval.runners.compare import compare_results
    from tracker_eval.runners.pairing import PairingError

    rng = np.random.default_rng(7)
    acc_a, acc_b = rng.random(40) < 0.55, rng.random(40) < 0.7
    nll_a, nll_b = rng.normal(2.0, 0.5, 40), rng.normal(1.9, 0.5, 40)

    def result(step, acc, nll, order):
        records = [{"doc_id": int(i), "filter": "none", "acc": float(acc[i]), "nll": float(nll[i]), "resps": [["x"]]}
                   for i in order]
        return EvalResult(step=step, checkpoint="", metrics={}, suite="harness", samples={"mc": records})

    a = result(1, acc_a, nll_a, range(40))
    b = result(2, acc_b, nll_b, rng.permutation(40))
    got = {c.metric: c for c in compare_results(a, b, suite="harness")}
    assert set(got) == {"mc/acc", "mc/nll"}
    want = stats.ttest_rel(nll_b, nll_a)
    assert _close(got["mc/nll"].test.p, float(want.pvalue)) and _close(got["mc/nll"].test.t, float(want.statistic))
    only_a, only_b = int(np.sum(acc_a & ~acc_b)), int(np.sum(~acc_a & acc_b))
    assert (got["mc/acc"].mcnemar.only_a, got["mc/acc"].mcnemar.only_b) == (only_a, only_b)
    assert _close(got["mc/acc"].mcnemar.p, stats.binomtest(only_b, only_a + only_b).pvalue)
    short = result(3, acc_b, nll_b, range(1, 40))
    differ = r"suite 'harness': task 'mc': documents differ between steps 1 and 3 \(1 only at 1, e.g. \(0, 'none'\)"
    with pytest.raises(PairingError, match=differ):
        compare_results(a, short, suite="harness")


def test_regression_alerts_raised_once_and_delivered_once(watched):
    config, _ = watched
    out = pathlib.Path(json.loads(config.read_text())["output_dir"])
    values = {step: _stored(config, step)[1] for step in (*STEPS, REGRESSED)}
    # What the reference says: step 70 against the best loss (60) and the previous accuracy (60).
    loss = stats.ttest_rel(values[REGRESSED]["example_loss"].astype(np.float64),
                           values[60]["example_loss"].astype(np.float64))
    assert loss.pvalue < 0.01 and loss.statistic > 0
    acc_a, acc_b = values[60]["example_accuracy"], values[REGRESSED]["example_accuracy"]
    only_a, only_b = int(np.sum((acc_a == 1) & (acc_b == 0))), int(np.sum((acc_a == 0) & (acc_b == 1)))
    acc_p = stats.binomtest(only_b, only_a + only_b).pvalue
    acc_fires = acc_p < 0.01 and acc_b.mean() - acc_a.mean() < -0.02
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records) == [*STEPS, REGRESSED]
    alerts = {a["metric"]: a for r in records for a in r.get("alerts", [])}
    assert all("alerts" not in r for r in records if r["step"] != REGRESSED)
    assert set(alerts) == ({"loss", "accuracy"} if acc_fires else {"loss"})
    got = alerts["loss"]
    assert (got["step"], got["reference_step"], got["against"], got["test"]) == (REGRESSED, 60, "best", "paired_t")
    interval = loss.confidence_interval(0.95)
    for key, want in (("p", loss.pvalue), ("low", interval.low), ("high", interval.high)):
        assert _close(got[key], float(want)), key
    assert got["message"].startswith(f"step {REGRESSED} is worse than step 60 (best) on loss")
    if acc_fires:
        assert _close(alerts["accuracy"]["p"], float(acc_p)) and alerts["accuracy"]["test"] == "mcnemar"
    # A restart raises and delivers nothing again: the alerts live in the stored result.
    again = _run("watch", "--config", config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == records
    console = WATCH_OUTPUT[0] + again.stdout + again.stderr
    assert console.count("WARNING: regression alert: ") == len(alerts)
    assert f"WARNING: regression alert: {got['message']}" in console


@pytest.mark.parametrize("rule, needle", [
    ("{metric: loss, against: worst}", "watch.alerts[0].against 'worst' is not one of best, previous"),
    ("{metric: loss, mode: lowest}", "watch.alerts[0].mode 'lowest' is not one of min, max"),
    ("{metric: loss, p: 1.5}", "watch.alerts[0].p 1.5 must be between 0 and 1"),
    ("{metric: loss, min_delta: -1}", "watch.alerts[0].min_delta -1.0 must be >= 0"),
    ("{metric: loss, suite: val}", "watch.alerts[0].suite 'val' is not a suite of this config"),
    ("{metric: loss, when: always}", "unknown config key watch.alerts[0].when"),
])
def test_bad_alert_rules_are_config_errors_naming_the_key(rule, needle):
    from tracker_eval.config import load_config
    from tracker_eval.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "configs" / "watch.yaml", overrides=[f"watch.alerts=[{rule}]"])
    assert needle in str(error.value)
