"""`watch.order: newest_first`: the newest step first, then the backlog from newer to older, a step
found meanwhile ahead of the rest of the backlog; every tracker still plots each step at its place."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import uuid

import numpy as np
import pytest
from test_suites import write_suites_config
from watcher_harness import (
    METRICS,
    WatcherProcess,
    assert_equal_to_reference,
    assert_exactly_once,
    publish,
    stored_metrics,
    wait_for,
    write_config,
)

from tracker_eval.config import load_config
from tracker_eval.errors import ConfigError

pytest_plugins = ["fixtures_mlflow", "watcher_harness"]


def _order_through(tmp_path: pathlib.Path, order: str) -> list[tuple[int, list[str]]]:
    """The (step, suites) decisions of a real Schedule over real ledgers: steps 500-2000 known, 2500
    found after the first decision, a late lower 1200 after the second; `harness` runs every 1000
    steps, `val` on every step."""
    from tracker_eval.ledger.lease import make_owner_id  # noqa: PLC0415
    from tracker_eval.runners.schedule import Schedule  # noqa: PLC0415
    from tracker_eval.runners.stream import open_ledgers  # noqa: PLC0415

    suites = {"val": {"eval_function": "m:e", "data": "m:d", "batch_size": 8},
              "harness": {"eval_function": "m:e", "data": "m:d", "batch_size": 8, "policy": {"every_n_steps": 1000}}}
    path = write_suites_config(tmp_path, suites, loggers=[], watch={"order": order}, name=f"{order}.yaml")
    config = load_config(path)
    config = dataclasses.replace(config, output_dir=str(tmp_path / order))
    ledgers = open_ledgers(config, loggers=[])
    schedule, owner, decisions = Schedule(config, ledgers), make_owner_id(), []
    schedule.register([500, 1000, 1500, 2000])
    while (decision := schedule.claim_next(owner=owner)) is not None:
        step, names = schedule.decode(decision)
        decisions.append((step, names))
        for name in names:
            ledgers[name].mark_skipped(step, "done here", owner=owner)  # out of the way, as a stored result would be
        if len(decisions) == 1:
            schedule.register([500, 1000, 1500, 2000, 2500])
        if len(decisions) == 2:
            schedule.register([500, 1000, 1200, 1500, 2000, 2500])
    assert ledgers["harness"].rows()[0]["reason"] == "policy every_n_steps=1000: not a multiple of 1000"
    for ledger in ledgers.values():
        ledger.close()
    return decisions


def test_newest_first_takes_a_step_found_meanwhile_ahead_of_the_backlog_and_each_suite_keeps_its_cadence(tmp_path):
    assert _order_through(tmp_path, "newest_first") == [
        (2000, ["val", "harness"]), (2500, ["val"]), (1200, ["val"]), (1500, ["val"]), (1000, ["val", "harness"]),
        (500, ["val"])]
    assert _order_through(tmp_path, "oldest_first") == [
        (500, ["val"]), (1000, ["val", "harness"]), (1200, ["val"]), (1500, ["val"]), (2000, ["val", "harness"]),
        (2500, ["val"])]


def test_a_bad_order_is_one_line(tmp_path):
    path = write_config(tmp_path, watch={"order": "newest"})
    with pytest.raises(ConfigError, match=r"^watch.order 'newest' is not one of oldest_first, newest_first$"):
        load_config(path)


def test_newest_first_watcher_every_tracker_plots_each_step_at_its_place(tmp_path, source_checkpoints, mlflow_server):
    from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415

    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    experiment = f"newest-first-{uuid.uuid4().hex[:8]}"
    loggers = [{"type": "jsonl"}, {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment": experiment},
               {"type": "wandb"}, {"type": "tensorboard"}]
    for step in (20, 40, 60):
        publish(source_checkpoints, ckpts, step)
    # Slow batches so that step 80 is published while step 60 is still being evaluated.
    config = write_config(tmp_path, watch={"poll_interval_s": 0.3, "order": "newest_first", "until_step": 80,
                                           "idle_timeout_s": 120}, loggers=loggers, delay_s=0.1)
    with WatcherProcess(config) as watcher:
        wait_for(lambda: watcher.evaluated_steps(), timeout=120, what="the first evaluation", watchers=[watcher])
        publish(source_checkpoints, ckpts, 80)
        code = watcher.wait_exit(timeout=300)
    assert code == 0, watcher.tail()
    assert watcher.evaluated_steps() == [60, 80, 40, 20], watcher.tail()

    stored = stored_metrics(out)
    assert_equal_to_reference(stored, ckpts, (20, 40, 60, 80))
    assert_exactly_once(out, stored, mlflow=(mlflow_server.url, experiment), wandb=True)
    (run_dir,) = (out / "tensorboard").iterdir()
    events = event_accumulator.EventAccumulator(str(run_dir)).Reload()
    for metric in METRICS:
        points = [(e.step, e.value) for e in events.Scalars(f"eval/{metric}")]
        assert [step for step, _ in points] == [20, 40, 60, 80], (metric, points)  # each once, at its place
        for step, value in points:
            assert np.float32(value) == np.float32(stored[step][metric]), (metric, step)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 60  # delivered as evaluated
