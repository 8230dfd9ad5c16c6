"""xlstm-jax's metric format ({"value", "count"} sums, scalars, log modes) and pytree batches, exact.

The same eval function written both ways must give the same numbers, and both the float64
reference over the real examples only: the data set is never a multiple of the batch size, so a
padding row inside a user-computed sum would show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from jax.sharding import PartitionSpec as P

from tracker_eval.config import MeshConfig
from tracker_eval.evaluation.evaluator import ExtendedEvaluation
from tracker_eval.evaluation.sharding import BatchPlacer, make_mesh
from tracker_eval.evaluation.state import EvalState
from tracker_eval.metrics import Mean, PerExample

N_EXAMPLES = 203  # not a multiple of any batch size below
FEATURES, HIDDEN, OUT = 6, 8, 4


@struct.dataclass
class Batch:
    """A batch the way xlstm-jax's data pipeline gives one: a flax struct dataclass, not a dict."""

    inputs: jax.Array
    targets: jax.Array
    targets_mask: jax.Array


def _data() -> dict[str, np.ndarray]:
    rs = np.random.RandomState(3)
    return {
        "inputs": rs.randn(N_EXAMPLES, FEATURES).astype(np.float32),
        "targets": rs.randn(N_EXAMPLES, OUT).astype(np.float32),
        "targets_mask": (rs.rand(N_EXAMPLES, OUT) > 0.3).astype(np.float32),
    }


def _params() -> dict[str, np.ndarray]:
    rs = np.random.RandomState(4)
    return {"w1": rs.randn(FEATURES, HIDDEN).astype(np.float32) * 0.5,
            "w2": rs.randn(HIDDEN, OUT).astype(np.float32) * 0.5}


def apply_fn(variables, x):
    hidden = jnp.tanh(x @ variables["params"]["w1"])
    # Tensor parallelism on a non-batch axis; the batch axis is already split by the framework.
    hidden = jax.lax.with_sharding_constraint(hidden, P(None, "tensor"))
    return hidden @ variables["params"]["w2"]


def _loader(data, batch_size):
    for start in range(0, N_EXAMPLES, batch_size):
        yield Batch(**{k: v[start:start + batch_size] for k, v in data.items()})


def xlstm_eval(params, apply, batch, rng):
    """Written for xlstm_jax.trainer.callbacks.extended_evaluation: sums over the batch, counts."""
    del rng
    preds = apply({"params": params}, batch.inputs)
    err = (preds - batch.targets) ** 2
    mask = batch.targets_mask
    return {
        "wmse": {"value": (err * mask).sum(), "count": mask.sum()},
        "mse": {"value": err.mean(-1).sum(), "count": err.shape[0], "log_modes": ("mean_nopostfix", "mean")},
        "top": (preds.argmax(-1) == batch.targets.argmax(-1)).mean(),  # a scalar: counts 1
        "example_err": {"value": err.mean(-1), "count": err.shape[0], "log_modes": ("single_noreduce",)},
        "example_sum": {"value": (err * mask).sum(-1), "count": mask.sum(-1),
                        "log_modes": ("single_noreduce_wcount",)},
    }, None


def kinds_eval(params, apply, batch, rng):
    """The same metrics with tracker-eval's kinds, under the names xlstm-jax's log modes give."""
    del rng
    preds = apply({"params": params}, batch.inputs)
    err = (preds - batch.targets) ** 2
    mask = batch.targets_mask
    return {
        "wmse": Mean(err, weights=mask),
        "mse": Mean(err.mean(-1)),
        "mse_mean": Mean(err.mean(-1)),
        "top": Mean(preds.argmax(-1) == batch.targets.argmax(-1)),
        "example_err_single_noreduce": PerExample(err.mean(-1)),
        "example_sum_single_noreduce_wcount": PerExample((err * mask).sum(-1)),
        "example_sum_single_noreduce_wcount_count": PerExample(mask.sum(-1)),
    }, None


def _reference(data, params):
    x, y, mask = (data[k].astype(np.float64) for k in ("inputs", "targets", "targets_mask"))
    preds = np.tanh(x @ params["w1"].astype(np.float64)) @ params["w2"].astype(np.float64)
    err = (preds - y) ** 2
    return {
        "wmse": (err * mask).sum() / mask.sum(),
        "mse": err.mean(-1).mean(),
        "mse_mean": err.mean(-1).mean(),
        "top": (preds.argmax(-1) == y.argmax(-1)).mean(),
        "example_err_single_noreduce": err.mean(-1),
        "example_sum_single_noreduce_wcount": (err * mask).sum(-1),
        "example_sum_single_noreduce_wcount_count": mask.sum(-1),
    }


@pytest.mark.parametrize("mesh_shape, batch_size", [((4, 2, 1), 24), ((2, 2, 2), 20), ((8, 1, 1), 10)])
def test_xlstm_metrics_equal_the_same_function_with_mean_and_per_example(mesh_shape, batch_size):
    data, params = _data(), _params()
    mesh = make_mesh(MeshConfig(*mesh_shape))
    results, evaluations = {}, {}
    for name, fn in (("xlstm", xlstm_eval), ("kinds", kinds_eval)):
        evaluations[name] = ExtendedEvaluation(model=apply_fn, mesh=mesh, batch_size=batch_size, eval_function=fn,
                                               progress=False)
        results[name] = evaluations[name].evaluate(EvalState.create(apply_fn=apply_fn, params=params),
                                                   _loader(data, batch_size))
    ours, theirs = results["kinds"], results["xlstm"]
    reference = _reference(data, params)
    assert set(theirs.metrics) == set(ours.metrics) == {"wmse", "mse", "mse_mean", "top"}
    assert set(theirs.per_example) == set(ours.per_example)
    for name, value in theirs.metrics.items():
        assert value == pytest.approx(ours.metrics[name], rel=1e-6), name
        assert value == pytest.approx(reference[name], rel=1e-5), name
    for name, rows in theirs.per_example.items():
        assert rows.shape == (N_EXAMPLES,), name  # real rows only, each once
        np.testing.assert_allclose(rows, ours.per_example[name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(rows, reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # One compile for the run, the short last batch included, and none for the next checkpoint.
    evaluation = evaluations["xlstm"]
    assert evaluation.trace_count == 1 and theirs.provenance["step_compiles"] == 1
    halved = jax.tree.map(lambda a: a * 0.5, params)
    again = evaluation.evaluate(EvalState.create(apply_fn=apply_fn, params=halved, step=2), _loader(data, batch_size))
    assert evaluation.trace_count == 1 and again.provenance["step_compiles"] == 0
    assert again.metrics["wmse"] == pytest.approx(_reference(data, halved)["wmse"], rel=1e-5)


def test_xlstm_style_subclass_keeps_its_surface():
    data, params = _data(), _params()
    calls = []

    class SeedStyle(ExtendedEvaluation):
        def eval_function(self, params, apply_fn, batch, rng):
            return xlstm_eval(params, apply_fn, batch, rng)

        def on_extended_evaluation_start(self):
            calls.append("start")

        def finalize_metrics(self, aggregated_metrics):
            final = super().finalize_metrics(aggregated_metrics)
            final["rmse"] = float(np.sqrt(final["mse"]))
            return final

        def on_extended_evaluation_end(self, final_metrics):
            calls.append(sorted(k for k, v in final_metrics.items() if not isinstance(v, np.ndarray)))
            super().on_extended_evaluation_end(final_metrics)

    exemplary = Batch(**{k: v[:16] for k, v in data.items()})
    evaluation = SeedStyle(model=apply_fn, mesh=make_mesh(MeshConfig(4, 2, 1)), batch_size=16,
                           exemplary_batch=exemplary, progress=False)
    evaluation.set_state(EvalState.create(apply_fn=apply_fn, params=params))
    zeros = evaluation.init_eval_metrics()  # shapes from the exemplary batch, before any step
    assert set(zeros) == {"wmse", "mse", "mse_mean", "top", "example_err_single_noreduce",
                          "example_sum_single_noreduce_wcount", "example_sum_single_noreduce_wcount_count",
                          "__batch_index__"}
    final = evaluation.eval_model(_loader(data, 16))
    assert calls == ["start", ["mse", "mse_mean", "rmse", "top", "wmse"]]
    assert final["rmse"] == pytest.approx(np.sqrt(_reference(data, params)["mse"]), rel=1e-5)
    assert final["example_err_single_noreduce"].shape == (N_EXAMPLES,)


@pytest.mark.parametrize(
    "metrics, error, message",
    [
        (lambda e: {"loss": {"value": e.sum(), "log_modes": ("std",)}}, ValueError,
         r"'loss' asks for log mode 'std'.*depends on batch size and mesh"),
        (lambda e: {"loss": {"value": e.sum(), "log_modes": ("median",)}}, ValueError,
         r"log mode 'median'; use one of mean_nopostfix, mean, single_noreduce, single_noreduce_wcount"),
        (lambda e: {"loss": {"sum": e.sum()}}, TypeError, r"'loss' has keys \['sum'\]"),
        (lambda e: {"loss": {"value": e, "count": e.shape[0]}}, TypeError,
         r"'loss': its value must be one number per batch .* shape \(1, 4\)"),
        (lambda e: {"loss": {"value": e.sum(), "log_modes": ("mean",)}, "loss_mean": e.mean()}, ValueError,
         r"two metrics named 'loss_mean'"),
        (lambda e: {"loss": e.sum(-1)}, TypeError,
         r"'loss' is an array of shape \(16,\); wrap it in .*Mean, Sum, Max, Min or PerExample.*\"value\""),
    ],
)
def test_unsupported_or_malformed_metrics_are_clear_errors(metrics, error, message):
    def bad_eval(params, apply, batch, rng):
        return metrics((apply({"params": params}, batch.inputs) - batch.targets) ** 2), None

    evaluation = ExtendedEvaluation(model=apply_fn, mesh=make_mesh(MeshConfig(8, 1, 1)), batch_size=16,
                                    eval_function=bad_eval, progress=False)
    with pytest.raises(error, match=message):
        evaluation.evaluate(EvalState.create(apply_fn=apply_fn, params=_params()), _loader(_data(), 16))


def test_any_pytree_batch_is_padded_leaf_by_leaf_and_tuples_work_with_metric_kinds():
    data = _data()
    placer = BatchPlacer(make_mesh(MeshConfig(4, 2, 1)), global_batch_size=16)
    nested = {"batch": Batch(**{k: v[:5] for k, v in data.items()}), "ids": (np.arange(5),)}
    placed, mask, host_mask = placer.place(nested)
    assert isinstance(placed["batch"], Batch)
    assert placed["batch"].inputs.shape == (16, FEATURES) and placed["ids"][0].shape == (16,)
    assert placed["batch"].inputs.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(placed["ids"][0]), [0, 1, 2, 3, 4] + [4] * 11)  # last row repeated
    np.testing.assert_array_equal(np.asarray(mask), host_mask)
    assert host_mask.tolist() == [True] * 5 + [False] * 11
    with pytest.raises(ValueError, match=r"leading sizes \{'\.inputs': 5, '\.targets': 4"):
        placer.place(Batch(inputs=data["inputs"][:5], targets=data["targets"][:4], targets_mask=data["targets"][:5]))

    def tuple_eval(params, apply, batch, rng):
        x, y = batch
        return {"mse": Mean(((apply({"params": params}, x) - y) ** 2).mean(-1))}, None

    params = _params()
    evaluation = ExtendedEvaluation(model=apply_fn, mesh=make_mesh(MeshConfig(4, 2, 1)), batch_size=24,
                                    eval_function=tuple_eval, progress=False)
    loader = ((b.inputs, b.targets) for b in _loader(data, 24))
    result = evaluation.evaluate(EvalState.create(apply_fn=apply_fn, params=params), loader)
    assert result.metrics["mse"] == pytest.approx(_reference(data, params)["mse"], rel=1e-5)
