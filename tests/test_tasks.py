"""Built-in tasks: linen and nnx classifiers and the byte LM against float64 references."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from reference import mlp_losses

from tracker_eval.config import MeshConfig
from tracker_eval.evaluation.evaluator import ExtendedEvaluation
from tracker_eval.evaluation.models import adapt_model, nnx_params
from tracker_eval.evaluation.sharding import make_mesh
from tracker_eval.evaluation.state import EvalState
from tracker_eval.tasks import classification as cls_task
from tracker_eval.tasks import language_model as lm_task


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_classification_task_matches_numpy(kind):
    if kind == "linen":
        module = cls_task.make_model()
        params = cls_task.init_params(module, seed=3)
    else:
        module = cls_task.make_nnx_model(seed=3)
        params = nnx_params(module)
    adapter = adapt_model(module)
    assert adapter.kind == kind
    evaluation = ExtendedEvaluation(model=adapter, mesh=make_mesh(MeshConfig(4, 2, 1)), batch_size=50,
                                    eval_function=cls_task.eval_function, progress=False)
    result = evaluation.evaluate(EvalState.create(apply_fn=adapter.apply_fn, params=params),
                                 cls_task.make_eval_data(split="validation", batch_size=50))
    x, y = cls_task.split_digits("validation")
    losses, correct = mlp_losses(params, x, y)
    assert result.metrics["loss"] == pytest.approx(losses.mean(), rel=1e-5)
    assert result.metrics["accuracy"] == pytest.approx(correct.mean(), rel=1e-5)
    np.testing.assert_allclose(result.per_example["example_loss"], losses, rtol=1e-4, atol=1e-6)


def test_language_model_task_token_weighted_metrics():
    module = lm_task.make_model()
    params = lm_task.init_params(module, seed=1)
    evaluation = ExtendedEvaluation(model=module, mesh=make_mesh(MeshConfig(2, 2, 2)), batch_size=12,
                                    eval_function=lm_task.eval_function, finalize_fn=lm_task.finalize,
                                    progress=False)
    result = evaluation.evaluate(EvalState.create(apply_fn=module.apply, params=params),
                                 lm_task.make_eval_data(split="validation", batch_size=12))
    data = lm_task.sequences("validation")
    # Reference: the model's logits once over the whole split, metric arithmetic in float64 numpy.
    logits = np.asarray(module.apply({"params": params}, data["inputs"]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok_loss = -np.take_along_axis(logp, data["targets"][..., None], -1)[..., 0]
    mask = data["mask"].astype(np.float64)
    assert mask.sum() < mask.size  # the last sequence is partly padding: weights matter
    loss = (tok_loss * mask).sum() / mask.sum()
    assert result.metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert result.metrics["tokens"] == mask.sum()
    assert result.metrics["perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
    acc = ((logits.argmax(-1) == data["targets"]) * mask).sum() / mask.sum()
    assert result.metrics["token_accuracy"] == pytest.approx(acc, rel=1e-5)
    per_seq = (tok_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
    np.testing.assert_allclose(result.per_example["sequence_loss"], per_seq, rtol=1e-4)


def test_process_batches_reassemble_in_dataset_order():
    from tracker_eval.tasks.batching import process_batches

    data = {"i": np.arange(23)}
    per_process = [list(process_batches(data, batch_size=8, process_index=p, process_count=3)) for p in range(3)]
    assert len({len(b) for b in per_process}) == 1  # every process yields the same number of batches
    order = np.concatenate([per_process[p][b]["i"] for b in range(len(per_process[0])) for p in range(3)])
    np.testing.assert_array_equal(order, np.arange(23))


def test_pydoc_text_is_split_by_distinct_paragraph():
    from tracker_eval.tasks import pydoc_text

    train, heldout = set(pydoc_text.paragraphs("train")), set(pydoc_text.paragraphs("heldout"))
    assert not train & heldout
    assert 0.08 < len(heldout) / (len(train) + len(heldout)) < 0.18
    assert pydoc_text.paragraphs("heldout") == pydoc_text.paragraphs.__wrapped__("heldout")  # deterministic


def test_language_model_training_writes_checkpoints_and_learns(tmp_path):
    from reference import restored_params

    from tracker_eval.tasks.train import train_language_model

    losses = []
    train_language_model(tmp_path / "ckpts", steps=40, save_every=20, on_step=lambda step, loss: losses.append(loss))
    assert sorted(int(p.name) for p in (tmp_path / "ckpts").iterdir() if p.name.isdigit()) == [20, 40]
    params = restored_params(tmp_path / "ckpts", 40)
    template = lm_task.init_params(lm_task.make_model())
    assert [np.shape(x) for x in jax.tree.leaves(params)] == [np.shape(x) for x in jax.tree.leaves(template)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0  # from ~5.5 nats (uniform bytes) down


def test_tiny_lm_keeps_segments_apart():
    """Packed rows (segment ids) give each segment the logits it has alone in a row."""
    module = lm_task.make_model()
    params = lm_task.init_params(module, seed=2)
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 256, (1, 5)), rng.integers(1, 256, (1, 7))
    packed = np.concatenate([a, b, np.zeros((1, 4), int)], axis=1)
    segments = np.array([[1] * 5 + [2] * 7 + [0] * 4])
    logits = np.asarray(module.apply({"params": params}, packed, segment_ids=segments))
    alone = [np.asarray(module.apply({"params": params}, x)) for x in (a, b)]
    np.testing.assert_allclose(logits[:, :5], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:12], alone[1], rtol=1e-5, atol=1e-5)
    unsegmented = np.asarray(module.apply({"params": params}, packed))
    assert not np.allclose(unsegmented[:, 5:12], alone[1], atol=1e-3)  # without ids, b would see a
