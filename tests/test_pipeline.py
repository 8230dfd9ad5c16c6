"""Config -> Orbax checkpoint -> restored params and BatchNorm statistics on the mesh -> metrics."""

from __future__ import annotations

import bn_task
import jax
import numpy as np
import pytest
from ckpt_factory import save_train_states

from tracker_eval.config import load_config
from tracker_eval.runners.pipeline import Pipeline

STEP = 7


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("bn") / "ckpts"
    return root, save_train_states(root, steps=[STEP], features=bn_task.FEATURES, in_features=bn_task.IN_FEATURES)


def _config(tmp_path, root, *overrides):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"checkpoint_dir: {root}\n"
        "model: bn_task:make_model\n"
        "eval_function: bn_task:eval_function\n"
        "data: bn_task:make_eval_data\n"
        "batch_size: 24\n"  # 100 examples: the last batch is short
        f"output_dir: {tmp_path / 'out'}\n"
        "checkpoint: {item: state, mutable: [batch_stats]}\n"
    )
    return load_config(path, overrides=list(overrides))


@pytest.mark.parametrize("mesh", [("mesh.data=8",), ("mesh.data=4", "mesh.fsdp=2"), ("mesh.data=2", "mesh.fsdp=4")])
def test_batch_stats_are_restored_and_used_on_any_mesh(tmp_path, saved, mesh):
    root, steps = saved
    pipeline = Pipeline(_config(tmp_path, root, *mesh), progress=False)
    state = pipeline.restore(STEP)
    fsdp = pipeline.mesh.shape["fsdp"]
    # params_sharding auto: fsdp over the largest divisible axis when the mesh has an fsdp axis.
    kernel = state.params["Dense_0"]["kernel"]  # (24, 64): 64 is the largest axis divisible by fsdp
    assert kernel.sharding.spec == (jax.sharding.PartitionSpec(None, "fsdp") if fsdp > 1
                                    else jax.sharding.PartitionSpec())
    assert sorted(state.mutable_variables) == ["batch_stats"]
    np.testing.assert_array_equal(np.asarray(state.mutable_variables["batch_stats"]["BatchNorm_0"]["mean"]),
                                  steps[STEP].batch_stats["BatchNorm_0"]["mean"])

    result = pipeline.evaluate_step(STEP)
    reference = bn_task.reference_outputs(steps[STEP].params, steps[STEP].batch_stats)
    np.testing.assert_allclose(result.per_example["row_sum"], reference.sum(-1), rtol=1e-4, atol=1e-4)
    assert result.metrics["out_mean"] == pytest.approx(reference.mean(-1).mean(), rel=1e-4, abs=1e-5)
    # With freshly initialized statistics (mean 0, var 1) instead of the saved ones (mean
    # step/1024, var 1 + step/1024) the numbers differ: the test sees whether they were used.
    fresh = {name: {"mean": np.zeros_like(s["mean"]), "var": np.ones_like(s["var"])}
             for name, s in steps[STEP].batch_stats.items()}
    unused = bn_task.reference_outputs(steps[STEP].params, fresh)
    assert not np.allclose(unused.sum(-1), reference.sum(-1), rtol=1e-3)
