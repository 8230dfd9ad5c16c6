"""Many evaluators, one PostgreSQL ledger, no shared disk: the work is shared and every result
reaches every tracker once, whichever machine evaluated it; an outage of the database is waited out.

Each watcher runs as on a machine of its own: its own working directory and output_dir (so no
file is shared: not the ledger, not the results, not a lock), the checkpoints (a bucket on a real
cluster) and the database being all they have in common. Values are checked against a float64
numpy evaluation of the same checkpoints.
"""

from __future__ import annotations

import collections
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from reference import restored_params, validation_metrics
from watcher_harness import (
    METRICS,
    SOURCE_STEPS,
    WatcherProcess,
    ledger_rows,
    mlflow_points,
    publish,
    wait_for,
    write_config,
)

from tracker_eval.config.ledger import ENV_VAR
from tracker_eval.loggers.jsonl import load_per_example, read_jsonl

pytest_plugins = ["fixtures_mlflow", "watcher_harness", "fixtures_postgres"]

LAST = SOURCE_STEPS[-1]


@pytest.fixture(scope="module")
def reference(source_checkpoints: Path) -> dict[int, tuple[np.ndarray, float]]:
    """{step: (float64 per-example losses, accuracy)} of the validation split."""
    return {step: validation_metrics(restored_params(source_checkpoints, step)) for step in SOURCE_STEPS}


def machines(tmp_path: Path, count: int, *, loggers: list[dict[str, str]], watch: dict[str, object]) -> list[Path]:
    """One config a machine, each in its own folder (its working directory) with its own output_dir."""
    configs = []
    for index in range(count):
        home = tmp_path / f"machine-{index}"
        home.mkdir()
        configs.append(write_config(home, checkpoint_dir=tmp_path / "ckpts", loggers=loggers, delay_s=0.3,
                                    watch=watch))
    return configs


def jsonl_everywhere(configs: list[Path]) -> dict[int, list[tuple[Path, dict]]]:
    """{step: [(the JSONL file, its record), ...]} over every machine's output_dir."""
    found: dict[int, list[tuple[Path, dict]]] = collections.defaultdict(list)
    for config in configs:
        path = config.parent / "out" / "metrics.jsonl"
        for record in read_jsonl(path) if path.exists() else []:
            found[int(record["step"])].append((path, record))
    return found


def assert_each_step_once_with_reference_values(configs: list[Path],
                                                reference: dict[int, tuple[np.ndarray, float]]) -> dict[int, Path]:
    """Every step in exactly one machine's JSONL, with its values and per-example arrays; {step: that file}."""
    found = jsonl_everywhere(configs)
    assert sorted(found) == list(SOURCE_STEPS), sorted(found)
    where = {}
    for step, entries in found.items():
        assert len(entries) == 1, f"step {step} delivered to JSONL {len(entries)} times: {[str(p) for p, _ in entries]}"
        path, record = entries[0]
        losses, accuracy = reference[step]
        assert record["metrics"]["loss"] == pytest.approx(losses.mean(), rel=1e-5)
        assert record["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        # The per-example arrays came along, wherever the step was evaluated.
        np.testing.assert_allclose(load_per_example(path, record)["example_loss"], losses, rtol=1e-4, atol=1e-6)
        where[step] = path
    return where


def assert_no_file_shared_or_left(configs: list[Path]) -> None:
    for config in configs:
        out = config.parent / "out"
        assert not (out / "ledger.sqlite").exists() and not (out / "results").exists(), sorted(out.iterdir())


def test_three_watchers_on_three_machines_share_the_work_and_deliver_each_result_once(
        tmp_path: Path, source_checkpoints: Path, mlflow_server, postgres_url: str,
        reference: dict[int, tuple[np.ndarray, float]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, postgres_url)  # the watchers' ledger, and `ledger_rows`'
    for step in SOURCE_STEPS:
        publish(source_checkpoints, tmp_path / "ckpts", step)
    experiment = f"scale-out-{uuid.uuid4().hex[:8]}"
    loggers = [{"type": "jsonl"}, {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment}]
    configs = machines(tmp_path, 3, loggers=loggers, watch={"poll_interval_s": 0.3, "until_step": LAST,
                                                           "lease_ttl_s": 30})
    watchers = [WatcherProcess(config).start() for config in configs]
    try:
        codes = [watcher.wait_exit(timeout=300) for watcher in watchers]
    finally:
        for watcher in watchers:
            watcher.kill9()
    assert codes == [0, 0, 0], "\n".join(w.tail() for w in watchers)
    evaluated = collections.Counter(step for watcher in watchers for step in watcher.evaluated_steps())
    assert evaluated == {step: 1 for step in SOURCE_STEPS}, evaluated
    evaluators = {watcher.pid: set(watcher.evaluated_steps()) for watcher in watchers}
    assert sum(bool(steps) for steps in evaluators.values()) >= 2, f"one watcher did all the work: {evaluators}"
    rows = ledger_rows(tmp_path / "unused")
    assert {s: (r["state"], r["attempts"]) for s, r in rows.items()} == {s: ("delivered", 1) for s in SOURCE_STEPS}
    # JSONL: each step once over all machines, values and arrays right, also where another machine evaluated it.
    where = assert_each_step_once_with_reference_values(configs, reference)
    delivered_by = {config.parent / "out" / "metrics.jsonl": watcher.pid
                    for config, watcher in zip(configs, watchers, strict=True)}
    crossed = [step for step, path in where.items() if step not in evaluators[delivered_by[path]]]
    assert crossed, f"every step was delivered where it was evaluated: {where}, {evaluators}"
    # MLflow: one run for the stream (three processes that share no disk), one point per step and metric.
    history = mlflow_points(mlflow_server.url, experiment)
    for step in SOURCE_STEPS:
        losses, accuracy = reference[step]
        want = {"loss": losses.mean(), "accuracy": accuracy}
        for metric in METRICS:
            points = [value for at, value in history[f"eval/{metric}"] if at == step]
            assert points == [pytest.approx(want[metric], rel=1e-5, abs=1e-6)], (metric, step, points)
        means = [value for at, value in history["eval/per_example/example_loss/mean"] if at == step]
        assert means == [pytest.approx(losses.mean(), rel=1e-5)], (step, means)
    assert_no_file_shared_or_left(configs)


def test_the_database_stopped_for_ten_seconds_mid_run_is_waited_out_and_nothing_is_lost_or_doubled(
        tmp_path: Path, source_checkpoints: Path, postgres_server, postgres_url: str,
        reference: dict[int, tuple[np.ndarray, float]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, postgres_url)
    for step in SOURCE_STEPS:
        publish(source_checkpoints, tmp_path / "ckpts", step)
    configs = machines(tmp_path, 2, loggers=[{"type": "jsonl"}],
                       watch={"poll_interval_s": 0.3, "until_step": LAST, "lease_ttl_s": 60})
    watchers = [WatcherProcess(config).start() for config in configs]
    try:
        # Mid-run: a result stored, and both watchers at work.
        wait_for(lambda: all(w.evaluated_steps() for w in watchers)
                 and any(r["state"] in ("evaluated", "delivered") for r in ledger_rows(tmp_path).values()),
                 timeout=180, what="both watchers evaluating, a result stored", watchers=watchers)
        postgres_server.stop()
        stopped_at = time.monotonic()
        try:
            wait_for(lambda: all("does not answer" in w.text for w in watchers), timeout=60,
                     what="every watcher to notice the outage", watchers=watchers)
            # Down for 10 s in all (a condition on the clock, not a guess at how long something takes).
            wait_for(lambda: time.monotonic() - stopped_at >= 10, timeout=30, what="ten seconds", watchers=watchers)
        finally:
            postgres_server.start()
        codes = [watcher.wait_exit(timeout=300) for watcher in watchers]
    finally:
        for watcher in watchers:
            watcher.kill9()
    assert codes == [0, 0], "\n".join(w.tail() for w in watchers)
    for watcher in watchers:
        assert "answers again" in watcher.text and "Traceback" not in watcher.text, watcher.tail()
        assert sum("does not answer" in line for _, line in watcher.lines) == 1, watcher.tail()
    evaluated = collections.Counter(step for watcher in watchers for step in watcher.evaluated_steps())
    assert evaluated == {step: 1 for step in SOURCE_STEPS}, evaluated  # nothing evaluated twice
    rows = ledger_rows(tmp_path)
    # The outage used no attempt, and every result reached the tracker once.
    assert {s: (r["state"], r["attempts"]) for s, r in rows.items()} == {s: ("delivered", 1) for s in SOURCE_STEPS}
    assert_each_step_once_with_reference_values(configs, reference)
    assert_no_file_shared_or_left(configs)
