"""The eval set kept between checkpoints: same numbers with cache host, device or none, the data
factory read once per process when cached, a set too large for cache_max_mb streamed as before."""

from __future__ import annotations

import dataclasses
import logging

import bn_task
import jax
import numpy as np
import pytest
from ckpt_factory import save_train_states

from tracker_eval.config import load_config
from tracker_eval.evaluation.evaluator import EvalAborted
from tracker_eval.evaluation.sharding import batch_sharding
from tracker_eval.runners.pipeline import Components, Pipeline

STEPS = (5, 10, 15)
BATCH = 24  # 100 examples: 5 batches, the last one short


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "ckpts"
    return root, save_train_states(root, steps=list(STEPS), features=bn_task.FEATURES,
                                   in_features=bn_task.IN_FEATURES)


class CountingData:
    """bn_task's data factory, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, **kwargs):
        self.calls += 1
        return bn_task.make_eval_data(**kwargs)


def _pipeline(tmp_path, root, *overrides) -> tuple[Pipeline, CountingData]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"checkpoint_dir: {root}\n"
        "model: bn_task:make_model\n"
        "eval_function: bn_task:eval_function\n"
        "data: bn_task:make_eval_data\n"
        f"batch_size: {BATCH}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "checkpoint: {item: state, mutable: [batch_stats]}\n"
        "mesh: {data: 4, fsdp: 2}\n"
    )
    config = load_config(path, overrides=list(overrides))
    data = CountingData()
    components = dataclasses.replace(Components.resolve(config), data_factory=data)
    return Pipeline(config, components=components, progress=False), data


def _assert_reference(result, saved_step):
    reference = bn_task.reference_outputs(saved_step.params, saved_step.batch_stats)
    np.testing.assert_allclose(result.per_example["row_sum"], reference.sum(-1), rtol=1e-4, atol=1e-4)
    assert result.metrics["out_mean"] == pytest.approx(reference.mean(-1).mean(), rel=1e-4, abs=1e-5)


def test_cache_modes_give_identical_results_and_cached_data_is_read_once(tmp_path, saved):
    root, steps = saved
    by_mode = {}
    for mode in ("none", "host", "device"):
        pipeline, data = _pipeline(tmp_path / mode, root, f"cache={mode}")
        results = [pipeline.evaluate_step(step) for step in STEPS]
        for step, result in zip(STEPS, results, strict=True):
            _assert_reference(result, steps[step])
        cached = mode != "none"
        assert data.calls == (1 if cached else len(STEPS)), mode
        assert [r.provenance["data_from_cache"] for r in results] == [False, cached, cached], mode
        assert [r.provenance["step_compiles"] for r in results] == [1, 0, 0], mode
        by_mode[mode] = results
        if mode == "device":  # placed global arrays, already sharded on the mesh
            kinds = {kind for kind, _ in pipeline.cache._batches}
            placed, mask, _ = pipeline.cache._batches[-1][1]
            assert kinds == {"device"} and placed["x"].sharding == batch_sharding(pipeline.mesh)
            assert np.asarray(mask).sum() == 100 - 4 * BATCH  # the short last batch keeps its mask
        if mode == "host":
            assert {kind for kind, _ in pipeline.cache._batches} == {"host"}
            assert pipeline.cache.nbytes == 5 * (BATCH * bn_task.IN_FEATURES * 4 + BATCH)  # padded x + mask
    for mode in ("host", "device"):  # the very same numbers as without a cache
        for cached, streamed in zip(by_mode[mode], by_mode["none"], strict=True):
            assert cached.metrics == streamed.metrics
            np.testing.assert_array_equal(cached.per_example["row_sum"], streamed.per_example["row_sum"])


def test_a_set_larger_than_cache_max_mb_streams_every_time_with_one_log_line(tmp_path, saved, caplog):
    root, steps = saved
    # Two of the five ~2.3 KB batches fit: the recording is dropped at the third.
    pipeline, data = _pipeline(tmp_path, root, "cache=host", "cache_max_mb=0.005")
    with caplog.at_level(logging.INFO, logger="tracker_eval"):
        results = [pipeline.evaluate_step(step) for step in STEPS]
    assert data.calls == len(STEPS)
    assert [r.provenance["data_from_cache"] for r in results] == [False] * len(STEPS)
    for step, result in zip(STEPS, results, strict=True):
        _assert_reference(result, steps[step])
    lines = [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()]
    assert len(lines) == 1 and "cache_max_mb=0.005" in lines[0], lines


def test_an_abandoned_first_evaluation_records_nothing(tmp_path, saved):
    root, steps = saved
    pipeline, data = _pipeline(tmp_path, root, "cache=host")
    checks = iter(range(100))
    pipeline.evaluation.should_abort = lambda: next(checks) == 2  # stop before the third batch
    with pytest.raises(EvalAborted):
        pipeline.evaluate_step(STEPS[0])
    pipeline.evaluation.should_abort = None
    first = pipeline.evaluate_step(STEPS[0])  # reads the data again, all of it this time
    second = pipeline.evaluate_step(STEPS[1])
    assert data.calls == 2
    assert (first.provenance["data_from_cache"], second.provenance["data_from_cache"]) == (False, True)
    _assert_reference(first, steps[STEPS[0]])
    _assert_reference(second, steps[STEPS[1]])
    assert jax.tree.leaves(pipeline.cache._batches)  # recorded on the complete evaluation
