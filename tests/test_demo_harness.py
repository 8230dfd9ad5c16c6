"""`tracker-eval demo --harness` end to end at a small size: the watcher scores the byte LM's checkpoints
with the config's suites `harness` (lm_harness) and `text` (held-out loss), delivered to MLflow and
JSONL, equal to lm-eval (and a loss) over a float64 reference of each checkpoint."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from tracker_eval_lm_harness.offline import prepare_environment

prepare_environment()  # before lm-eval (and with it `datasets`) is imported by the reference

import numpy as np  # noqa: E402
from harness_reference import ReferenceLM, log_softmax, tiny_lm_logits  # noqa: E402
from tracker_eval_lm_harness.tasks import SHIPPED  # noqa: E402

EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
STEPS, LIMIT, MAX_LENGTH = [50, 100], 8, 256  # MAX_LENGTH: the demo suite's max_length


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


def _params(step: int, checkpoint_dir: pathlib.Path) -> dict:
    """The checkpoint's params, read here with Orbax, not through tracker-eval."""
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(str(checkpoint_dir / str(step) / "default"))["params"]


def _reference(params: dict) -> dict:
    """lm-eval's own simple_evaluate on the shipped tasks, every request answered by a float64 numpy
    forward pass of the params."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(SHIPPED)
        return evaluator.simple_evaluate(
            model=ReferenceLM(tiny_lm_logits(params), max_length=MAX_LENGTH), tasks=["pydoc"],
            task_manager=TaskManager(include_path=str(SHIPPED), include_defaults=False), limit=LIMIT,
            bootstrap_iters=100, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            fewshot_random_seed=1234)


def _text_loss(params: dict) -> float:
    """The token-weighted loss on the held-out pydoc sequences, one float64 forward pass per sequence."""
    from tracker_eval.tasks.language_model import sequences

    data, logits = sequences("validation", corpus_name="pydoc"), tiny_lm_logits(params)
    total = count = 0.0
    for inputs, targets, mask in zip(data["inputs"], data["targets"], data["mask"], strict=True):
        logp = log_softmax(logits(list(inputs)))[np.arange(len(targets)), targets]
        total, count = total - float(np.sum(logp * mask)), count + float(np.sum(mask))
    return total / count


def _named(results: dict) -> dict[str, float]:
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if comma and filter_name == "none" and isinstance(value, float | int) and not isinstance(value, bool):
                out[f"{task}/{metric}"] = float(value)
    return out


def test_the_watcher_delivers_every_suite_equal_to_float64_references_in_mlflow(demo):
    out, proc = demo
    assert "Traceback" not in proc.stderr and "it/s]" not in proc.stderr  # no lm-eval progress bars
    for step in STEPS:  # the console logger's table of each suite's result
        assert f"eval/harness step {step} (" in proc.stdout and f"eval/text step {step} (" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tracker-eval-demo").experiment_id])

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    expected = {}
    for step in STEPS:
        params = _params(step, out / "checkpoints")
        expected[step] = {f"eval/harness/{name}": value for name, value in _named(_reference(params)).items()}
        expected[step]["eval/text/loss"] = _text_loss(params)
    # Exactly lm-eval's metric names under <prefix>/<suite>/<task>/<metric>: every task's, stderr included.
    harness_keys = {key for key in run.data.metrics if key.startswith("eval/harness/")}
    assert harness_keys == {key for key in expected[STEPS[0]] if key.startswith("eval/harness/")}
    for key in ("eval/harness/pydoc_cloze/acc", "eval/harness/pydoc_cloze/acc_norm",
                "eval/harness/pydoc_cloze/acc_stderr", "eval/harness/pydoc_gen/exact_match",
                "eval/harness/pydoc_ppl/bits_per_byte",
                "eval/harness/pydoc_ppl/word_perplexity", "eval/text/loss"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    delivered = {key: history(key) for key in expected[STEPS[0]]}
    assert all(sorted(points) == STEPS for points in delivered.values()), delivered
    for step in STEPS:
        for key, value in expected[step].items():
            assert delivered[key][step] == pytest.approx(value, rel=1e-4, abs=1e-9), (step, key)
    # The LM learns: held-out bits per byte and loss fall from the first checkpoint to the last.
    bits_per_byte = delivered["eval/harness/pydoc_ppl/bits_per_byte"]
    assert bits_per_byte[100] < bits_per_byte[50]
    assert delivered["eval/text/loss"][100] < delivered["eval/text/loss"][50]

    # Per-sample records: an MLflow artifact per task, the same records in the JSONL logger's files.
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples/harness/step_100")]
    assert artifacts == [f"samples/harness/step_100/{task}.jsonl" for task in ("pydoc_cloze", "pydoc_gen", "pydoc_ppl")]
    local = client.download_artifacts(run.info.run_id, artifacts[0], str(out.parent / "download"))
    records = [json.loads(line) for line in pathlib.Path(local).read_text().splitlines()]
    assert sorted(r["doc_id"] for r in records) == list(range(LIMIT))
    lines = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]
    (line,) = [r for r in lines if r["step"] == 100 and r.get("suite") == "harness"]
    on_disk = (out / line["samples"]["pydoc_cloze"]).read_text().splitlines()
    assert [json.loads(text) for text in on_disk] == records
    assert sum(r["acc"] for r in records) / LIMIT == pytest.approx(delivered["eval/harness/pydoc_cloze/acc"][100])


def test_compare_pairs_the_harness_records_by_document(demo):
    """`tracker-eval compare` of the two checkpoints: per document, equal to scipy on the records."""
    from scipy import stats

    out, _ = demo
    proc = subprocess.run([EXE, "compare", "--config", str(out / "demo.yaml"), "50", "100", "--suite", "harness",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = {entry["metric"]: entry for entry in json.loads(proc.stdout)["metrics"]}
    lines = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in lines if r.get("suite") == "harness"}

    def values(step: int, metric: str) -> np.ndarray:
        records = [json.loads(t) for t in (out / by_step[step]["samples"]["pydoc_cloze"]).read_text().splitlines()]
        by_doc = {r["doc_id"]: float(r[metric]) for r in records}
        return np.asarray([by_doc[doc] for doc in sorted(by_doc)])

    for metric in ("acc", "acc_norm"):
        a, b = values(50, metric), values(100, metric)
        entry = got[f"pydoc_cloze/{metric}"]
        assert entry["n"] == LIMIT
        assert entry["mean_a"] == pytest.approx(a.mean(), rel=1e-9) and entry["mean_b"] == pytest.approx(b.mean())
        want = stats.ttest_rel(b, a)
        if np.all(a == b):
            assert entry["p"] is None and entry["diff"] == 0
        else:
            assert entry["p"] == pytest.approx(float(want.pvalue), rel=1e-9)
        only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
        assert (entry["mcnemar"]["only_a"], entry["mcnemar"]["only_b"]) == (only_a, only_b)
        expected = stats.binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
        assert entry["mcnemar"]["p"] == pytest.approx(expected, rel=1e-9)
