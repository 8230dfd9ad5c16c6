"""ExtendedEvaluation on 8 fake CPU devices: exact on every mesh, one compile, hooks, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tracker_eval.config import MeshConfig
from tracker_eval.evaluation.evaluator import EvalError, ExtendedEvaluation
from tracker_eval.evaluation.sharding import make_mesh
from tracker_eval.evaluation.state import EvalState
from tracker_eval.metrics import Max, Mean, Min, PerExample, Sum

N_EXAMPLES = 203  # not a multiple of any global batch below
FEATURES, HIDDEN, OUT = 6, 8, 4


def _data():
    rs = np.random.RandomState(0)
    return {
        "x": rs.randn(N_EXAMPLES, FEATURES).astype(np.float32),
        "y": rs.randn(N_EXAMPLES, OUT).astype(np.float32),
        "w": (rs.rand(N_EXAMPLES, OUT) > 0.25).astype(np.float32),
    }


def _params():
    rs = np.random.RandomState(1)
    return {"w1": rs.randn(FEATURES, HIDDEN).astype(np.float32) * 0.5,
            "w2": rs.randn(HIDDEN, OUT).astype(np.float32) * 0.5}


def apply_fn(variables, x):
    params = variables["params"]
    hidden = jnp.tanh(x @ params["w1"])
    # Tensor parallelism: the hidden activations are sharded on a non-batch axis.
    hidden = jax.lax.with_sharding_constraint(hidden, P(("data", "fsdp"), "tensor"))
    return hidden @ params["w2"]


def eval_fn(params, apply, batch, rng):
    del rng
    err = (apply({"params": params}, batch["x"]) - batch["y"]) ** 2
    per_example = err.mean(-1)
    return {
        "wmse": Mean(err, weights=batch["w"]),
        "mse": Mean(per_example),
        "weight_total": Sum(batch["w"]),
        "neg_max": Max(-per_example - 1.0),
        "neg_min": Min(-per_example - 1.0),
        "rows": PerExample(per_example),
    }, None


def _reference(data, params):
    x, y, w = (data[k].astype(np.float64) for k in ("x", "y", "w"))
    err = (np.tanh(x @ params["w1"].astype(np.float64)) @ params["w2"].astype(np.float64) - y) ** 2
    per_example = err.mean(-1)
    return {
        "wmse": (err * w).sum() / w.sum(),
        "mse": per_example.mean(),
        "weight_total": w.sum(),
        "neg_max": (-per_example - 1.0).max(),
        "neg_min": (-per_example - 1.0).min(),
        "rows": per_example,
    }


def _loader(data, batch_size):
    for start in range(0, N_EXAMPLES, batch_size):
        yield {k: v[start:start + batch_size] for k, v in data.items()}


@pytest.mark.parametrize(
    "mesh_shape, batch_size",
    [((1, 1, 1), 16), ((8, 1, 1), 20), ((4, 2, 1), 36), ((2, 2, 2), 20)],
)
def test_metrics_equal_float64_reference_on_every_mesh(mesh_shape, batch_size):
    data, params = _data(), _params()
    mesh = make_mesh(MeshConfig(*mesh_shape))
    evaluation = ExtendedEvaluation(model=apply_fn, mesh=mesh, batch_size=batch_size, eval_function=eval_fn,
                                    progress=False)
    result = evaluation.evaluate(EvalState.create(apply_fn=apply_fn, params=params, step=7),
                                 _loader(data, batch_size))
    reference = _reference(data, params)
    assert result.step == 7
    for name in ("wmse", "mse", "weight_total", "neg_max", "neg_min"):
        assert result.metrics[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-6), name
    assert reference["neg_max"] < 0  # the all-negative case the seed's max got wrong
    rows = result.per_example["rows"]
    assert rows.shape == (N_EXAMPLES,)  # nothing dropped or counted twice
    np.testing.assert_allclose(rows, reference["rows"], rtol=1e-5, atol=1e-6)
    assert result.provenance["mesh_shape"] == dict(zip(("data", "fsdp", "tensor"), mesh_shape, strict=True))


def test_step_compiles_once_per_eval_model_short_last_batch_included():
    data, params = _data(), _params()
    mesh = make_mesh(MeshConfig(4, 2, 1))
    compiles: list[str] = []  # every backend (XLA) compile, by function name

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        evaluation = ExtendedEvaluation(model=apply_fn, mesh=mesh, batch_size=24, eval_function=eval_fn,
                                        progress=False)
        state = EvalState.create(apply_fn=apply_fn, params=params)
        evaluation.evaluate(state, _loader(data, 24))  # 9 batches, the last one short (11 rows)
        assert evaluation.trace_count == 1
        first_run = len(compiles)
        assert [name for name in compiles if "eval_step" in name] == ["jit(eval_step)"], compiles
        second_params = jax.tree.map(lambda a: a * 0.5, params)
        result = evaluation.evaluate(state.replace(params=second_params, step=2), _loader(data, 24))
        assert evaluation.trace_count == 1
        assert len(compiles) == first_run  # no backend compile at all in the second evaluation
        assert result.provenance["step_compiles"] == 0
        assert result.metrics["mse"] == pytest.approx(_reference(data, second_params)["mse"], rel=1e-5)
    finally:
        jax.monitoring.clear_event_listeners()


def test_hooks_and_listeners_see_the_result_and_a_bad_listener_is_isolated():
    data, params = _data(), _params()
    seen, calls = [], []

    class Hooked(ExtendedEvaluation):
        def on_extended_evaluation_start(self):
            calls.append("start")

        def eval_function(self, params, apply, batch, rng):
            return eval_fn(params, apply, batch, rng)

    def broken(result):
        raise RuntimeError("tracker down")

    evaluation = Hooked(model=apply_fn, mesh=make_mesh(MeshConfig(8, 1, 1)), batch_size=32,
                        listeners=[broken, seen.append], progress=False)
    evaluation.evaluate(EvalState.create(apply_fn=apply_fn, params=params, step=3), _loader(data, 32))
    assert calls == ["start"]
    assert len(seen) == 1 and seen[0].step == 3
    assert seen[0].metrics["mse"] == pytest.approx(_reference(data, params)["mse"], rel=1e-5)


def test_rng_differs_per_batch_and_repeats_per_run():
    def rng_eval(params, apply, batch, rng):
        noise = jax.random.uniform(rng, (batch["x"].shape[0],))
        return {"noise": PerExample(noise)}, None

    data = _data()
    evaluation = ExtendedEvaluation(model=apply_fn, mesh=make_mesh(MeshConfig(8, 1, 1)), batch_size=16,
                                    eval_function=rng_eval, progress=False)
    state = EvalState.create(apply_fn=apply_fn, params=_params())
    first = evaluation.evaluate(state, _loader(data, 16)).per_example["noise"]
    second = evaluation.evaluate(state, _loader(data, 16)).per_example["noise"]
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first[:16], first[16:32])


def test_empty_loader_and_oversized_batch_are_clear_errors():
    evaluation = ExtendedEvaluation(model=apply_fn, mesh=make_mesh(MeshConfig(8, 1, 1)), batch_size=16,
                                    eval_function=eval_fn, progress=False)
    state = EvalState.create(apply_fn=apply_fn, params=_params())
    with pytest.raises(EvalError, match="no batches"):
        evaluation.evaluate(state, iter([]))
    with pytest.raises(ValueError, match="40 rows.*batch_size=16"):
        evaluation.evaluate(state, _loader(_data(), 40))


def test_from_train_state_takes_params_batch_stats_and_step():
    import optax
    from flax.training import train_state

    params = _params()
    ts = train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=optax.adam(1e-3))
    state = EvalState.from_train_state(train_state=ts.replace(step=42))
    assert int(state.step) == 42 and state.apply_fn is apply_fn
    assert state.params is params and state.mutable_variables is None


def test_live_params_already_on_the_mesh_are_used_where_they_are():
    from jax.sharding import NamedSharding

    data, params = _data(), _params()
    mesh = make_mesh(MeshConfig(4, 2, 1))
    # Sharded the way a training step might have left them, not the eval rule (replicated).
    live = {k: jax.device_put(v, NamedSharding(mesh, P("fsdp"))) for k, v in params.items()}
    evaluation = ExtendedEvaluation(model=apply_fn, mesh=mesh, batch_size=24, eval_function=eval_fn,
                                    params_sharding="replicated", progress=False)
    result = evaluation.evaluate(EvalState.create(apply_fn=apply_fn, params=live), _loader(data, 24))
    assert all(evaluation.state.params[k] is live[k] for k in live)  # no copy
    assert result.metrics["mse"] == pytest.approx(_reference(data, params)["mse"], rel=1e-5)
    host = evaluation.evaluate(EvalState.create(apply_fn=apply_fn, params=params), _loader(data, 24))
    assert host.metrics["mse"] == pytest.approx(result.metrics["mse"], rel=1e-6)


def test_exemplary_batch_hook_and_alternative_eval_step_define_the_accumulators():
    data, params = _data(), _params()

    class WithWeights(ExtendedEvaluation):
        def create_modified_exemplary_batch(self, exmp_batch):
            return {**exmp_batch, "w": np.ones_like(exmp_batch["y"])}  # an eval-only field

    exemplary = {k: v[:16] for k, v in data.items() if k != "w"}
    evaluation = WithWeights(model=apply_fn, mesh=make_mesh(MeshConfig(8, 1, 1)), batch_size=16,
                             eval_function=eval_fn, exemplary_batch=exemplary, progress=False)
    evaluation.set_state(EvalState.create(apply_fn=apply_fn, params=params))
    zeros = jax.device_get(evaluation.init_eval_metrics())  # shapes from the modified exemplary batch
    assert set(zeros) == {"wmse", "mse", "weight_total", "neg_max", "neg_min", "rows", "__batch_index__"}
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(zeros["wmse"]))
    assert np.all(np.isneginf(jax.tree.leaves(zeros["neg_max"])[0]))  # Max starts at -inf, not 0
    # The whole evaluation then uses those accumulators and is exact.
    final = evaluation.eval_model(_loader(data, 16))
    assert final["wmse"] == pytest.approx(_reference(data, params)["wmse"], rel=1e-5)

    def alternative(params, mutable, batch, rng):  # the seed's hook: another metric structure
        return {"only": Sum(batch["x"][:, 0])}

    other = ExtendedEvaluation(model=apply_fn, mesh=make_mesh(MeshConfig(8, 1, 1)), batch_size=16,
                               eval_function=eval_fn, exemplary_batch={k: v[:16] for k, v in data.items()},
                               progress=False)
    other.set_state(EvalState.create(apply_fn=apply_fn, params=params))
    assert set(other.init_eval_metrics(alternative_eval_step=alternative)) == {"only", "__batch_index__"}
