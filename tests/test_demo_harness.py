"""`tracker-eval demo --harness` end to end at a small size: the byte LM's checkpoints scored by the
harness, delivered to MLflow and JSONL, equal to lm-eval over a float64 reference of each checkpoint."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from tracker_eval_lm_harness.offline import prepare_environment

prepare_environment()  # before lm-eval (and with it `datasets`) is imported by the reference

from harness_reference import ReferenceLM, tiny_lm_logits  # noqa: E402
from tracker_eval_lm_harness.tasks import SHIPPED  # noqa: E402

EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
STEPS, LIMIT, MAX_LENGTH = [50, 100], 8, 256  # MAX_LENGTH: the demo suite's max_length
HEADLINE = ["pydoc_cloze/acc", "pydoc_cloze/acc_norm", "pydoc_gen/exact_match", "pydoc_ppl/bits_per_byte",
            "pydoc_ppl/word_perplexity"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-harness") / "run"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([EXE, "demo", "--harness", "--steps", "100", "--limit", str(LIMIT), "--no-wandb",
                           "--no-tensorboard", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc


def _reference(step: int, checkpoint_dir: pathlib.Path) -> dict:
    """lm-eval's own simple_evaluate on the shipped tasks, every request answered by a float64 numpy
    forward pass of the checkpoint's params (read here with Orbax, not through tracker-eval)."""
    import orbax.checkpoint as ocp
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    tree = ocp.PyTreeCheckpointer().restore(str(checkpoint_dir / str(step) / "default"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(SHIPPED)
        return evaluator.simple_evaluate(
            model=ReferenceLM(tiny_lm_logits(tree["params"]), max_length=MAX_LENGTH), tasks=["pydoc"],
            task_manager=TaskManager(include_path=str(SHIPPED), include_defaults=False), limit=LIMIT,
            bootstrap_iters=100, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            fewshot_random_seed=1234)


def _named(results: dict) -> dict[str, float]:
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if comma and filter_name == "none" and isinstance(value, float | int) and not isinstance(value, bool):
                out[f"{task}/{metric}"] = float(value)
    return out


def test_scores_rise_and_equal_lm_eval_over_a_float64_reference_in_mlflow(demo):
    out, proc = demo
    assert "Traceback" not in proc.stderr and "it/s]" not in proc.stderr  # no lm-eval progress bars
    for step in STEPS:
        assert f"harness: step {step:>4}  pydoc_cloze/acc" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tracker-eval-demo").experiment_id])
    keys = list(run.data.metrics)

    def history(name: str) -> dict[int, float]:
        (key,) = [k for k in keys if k.endswith(f"/{name}")]
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    delivered = {name: history(name) for name in HEADLINE}
    assert all(sorted(points) == STEPS for points in delivered.values()), delivered
    # The LM learns: held-out bits per byte fall from the first checkpoint to the last.
    assert delivered["pydoc_ppl/bits_per_byte"][100] < delivered["pydoc_ppl/bits_per_byte"][50]
    for step in STEPS:
        expected = _named(_reference(step, out / "checkpoints"))
        for name in HEADLINE:
            assert delivered[name][step] == pytest.approx(expected[name], rel=1e-4, abs=1e-9), (step, name)

    # Per-sample records: an MLflow artifact per task, the same records in the JSONL logger's files.
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples/harness/step_100")]
    assert artifacts == [f"samples/harness/step_100/{task}.jsonl" for task in ("pydoc_cloze", "pydoc_gen", "pydoc_ppl")]
    local = client.download_artifacts(run.info.run_id, artifacts[0], str(out.parent / "download"))
    records = [json.loads(line) for line in pathlib.Path(local).read_text().splitlines()]
    assert sorted(r["doc_id"] for r in records) == list(range(LIMIT))
    (line,) = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["step"] == 100]
    on_disk = (out / line["samples"]["pydoc_cloze"]).read_text().splitlines()
    assert [json.loads(text) for text in on_disk] == records
    assert sum(r["acc"] for r in records) / LIMIT == pytest.approx(delivered["pydoc_cloze/acc"][100])
