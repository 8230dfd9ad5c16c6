"""W&B logger in offline mode, read back from the run's own .wandb files with wandb's inspector."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tracker_eval_wandb import reader
from tracker_eval_wandb.logger import WandbConfig, WandbLogger, derive_run_id

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import LoggerContext

SECRET = "fake-secret-0123456789abcdef0123456789abcdef"


def _result(step: int, loss: float) -> EvalResult:
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": loss},
                      per_example={"loss": np.array([loss, 2 * loss])})


def test_out_of_order_steps_kept_and_restart_does_not_duplicate(tmp_path):
    context = LoggerContext(output_dir=str(tmp_path), run_key="wandb-order")
    logger = WandbLogger(WandbConfig(mode="offline"), context=context)
    logger.log_config({"model": "mlp"})
    # A 2-D per-example array is no table column, but it gets a histogram over all its values.
    margins = np.random.default_rng(3).normal(size=(150, 2)).astype(np.float32)
    first = _result(300, 0.25)
    logger.log_result(EvalResult(step=300, checkpoint=first.checkpoint, metrics=first.metrics,
                                 per_example={**first.per_example, "margin": margins}))
    logger.log_result(_result(100, 0.75))
    logger.set_summary({"best/loss": 0.25, "best/step": 300})
    logger.flush()
    assert logger.run_state() == {"run_id": derive_run_id("wandb-order")}
    rows = reader.read_history(logger.wandb_dir, logger.run_id)
    assert [(r["checkpoint_step"], r["eval/loss"]) for r in rows] == [(300, 0.25), (100, 0.75)]
    assert rows[0]["eval/per_example_table.nrows"] == 2
    counts, edges = np.histogram(margins.astype(np.float64).ravel(), bins=64)  # wandb.Histogram's default bins
    assert rows[0]["eval/per_example/margin._type"] == "histogram"
    assert rows[0]["eval/per_example/margin.values"] == counts.tolist()
    np.testing.assert_allclose(rows[0]["eval/per_example/margin.bins"], edges, rtol=1e-6)
    counts, edges = np.histogram(np.array([0.75, 1.5]), bins=64)
    assert rows[1]["eval/per_example/loss.values"] == counts.tolist()
    np.testing.assert_allclose(rows[1]["eval/per_example/loss.bins"], edges, rtol=1e-6)

    # A new logger instance (a restarted process) on the same run key resumes the same run.
    again = WandbLogger(WandbConfig(mode="offline"), context=context)
    again.log_result(_result(300, 0.25))
    again.log_result(_result(200, 0.5))
    again.close()
    assert again.run_id == logger.run_id
    assert len(reader.run_dirs(logger.wandb_dir, logger.run_id)) == 2
    rows = reader.read_history(logger.wandb_dir, logger.run_id)
    steps = sorted(r["checkpoint_step"] for r in rows)
    assert steps == [100, 200, 300]
    summary = reader.read_summary_updates(logger.wandb_dir, logger.run_id)
    assert summary["best/step"] == 300 and summary["best/loss"] == 0.25


def test_an_alert_goes_out_once_with_its_step(tmp_path):
    context = LoggerContext(output_dir=str(tmp_path), run_key="wandb-alert")
    alert = {"suite": "", "metric": "loss", "step": 300, "reference_step": 100, "message": "step 300 is worse"}
    with_alert = EvalResult(step=300, checkpoint="/ckpt/300", metrics={"loss": 0.9}, alerts=(alert,))
    logger = WandbLogger(WandbConfig(mode="offline"), context=context)
    logger.log_result(_result(100, 0.5))
    logger.log_result(with_alert)
    logger.close()
    again = WandbLogger(WandbConfig(mode="offline"), context=context)  # a restart resends step 300
    again.log_result(with_alert)
    again.close()
    alerts = reader.read_alerts(logger.wandb_dir, logger.run_id)
    assert [(a["title"], a["text"], a["level"]) for a in alerts] == [
        ("tracker-eval: eval/loss regressed at step 300", "step 300 is worse", "WARN")]


# lm-eval records of three request types, as the harness suite hands them on (JSON-safe).
SAMPLES = {
    "t_mc": [{"doc_id": i, "doc": {"q": "?"}, "target": i % 2, "arguments": [["Q: 2+2?", f" {c}"] for c in "34"],
              "resps": [[[-0.1 - i / 3, False]], [[-0.7, True]]],
              "filtered_resps": [[-0.1 - i / 3, False], [-0.7, True]], "filter": "none",
              "metrics": ["acc", "acc_norm"], "acc": float(i % 2), "acc_norm": 1.0} for i in range(3)],
    "t_ppl": [{"doc_id": 0, "target": "", "arguments": [["some text", None]], "resps": [[-41.25]],
               "filtered_resps": [-41.25], "filter": "none", "metrics": ["word_perplexity", "bits_per_byte"],
               "word_perplexity": [-41.25, 2], "bits_per_byte": [-41.25, 9]}],
    "t_gen": [{"doc_id": 4, "target": "caf\u00e9", "arguments": [["Finish: ca", {"until": ["\n"], "max_gen_toks": 8}]],
               "resps": [["f\u00e9 \u2603"]], "filtered_resps": ["f\u00e9"], "filter": "strict-match",
               "metrics": ["exact_match"], "exact_match": 0.0}],
}


def test_samples_are_one_table_per_task_in_the_row_and_a_resend_does_not_duplicate(tmp_path):
    context = LoggerContext(output_dir=str(tmp_path), run_key="wandb-samples")
    logger = WandbLogger(WandbConfig(mode="offline", table_max_rows=2), context=context)
    result = EvalResult(step=40, checkpoint="/ckpt/40", metrics={"t_mc/acc": 1 / 3}, suite="harness",
                        samples=SAMPLES)
    logger.log_result(result)
    logger.flush()
    # A takeover after the delivery was sent but not acknowledged: the row is not logged again.
    again = WandbLogger(WandbConfig(mode="offline", table_max_rows=2), context=context)
    again.reconcile({40: 0.0})
    again.log_result(result)
    again.close()
    rows = reader.read_history(logger.wandb_dir, logger.run_id)
    assert [r["checkpoint_step"] for r in rows] == [40]
    tables = {task: reader.read_table(logger.wandb_dir, logger.run_id, rows[0], f"eval/harness/samples/{task}")
              for task in SAMPLES}
    for task, records in SAMPLES.items():
        columns, data = tables[task]["columns"], tables[task]["data"]
        metrics = records[0]["metrics"]
        assert columns == ["doc_id", "filter", "target", "arguments", "resps", "filtered_resps", *metrics], task
        assert len(data) == min(len(records), 2)  # table_max_rows
        for record, cells in zip(records, data, strict=False):
            cell = dict(zip(columns, cells, strict=True))
            assert (cell["doc_id"], cell["filter"]) == (record["doc_id"], record["filter"])
            for name in ("target", "arguments", "resps", "filtered_resps"):
                assert json.loads(cell[name]) == record[name], (task, name)
            for name in metrics:  # numbers stay numbers; per-sample pairs (perplexity) are JSON text
                value = record[name]
                assert (cell[name] == value) if isinstance(value, float) else (json.loads(cell[name]) == value)


def test_failed_finish_is_retried_and_never_reported_as_written(tmp_path):
    # A unit test of failure handling: wandb's finish is made to fail once (e.g. wandb-core died).
    logger = WandbLogger(WandbConfig(mode="offline"), context=LoggerContext(output_dir=str(tmp_path), run_key="fin"))
    result = _result(10, 0.5)
    logger.log_result(result)
    run = logger._run
    real_finish = run.finish

    def broken_finish(*args, **kwargs):
        raise RuntimeError("wandb-core went away")

    run.finish = broken_finish
    with pytest.raises(RuntimeError, match="went away"):
        logger.flush()
    run.finish = real_finish
    logger.log_result(result)  # the outbox's next attempt
    logger.flush()
    rows = reader.read_history(logger.wandb_dir, logger.run_id)
    assert [(r["checkpoint_step"], r["eval/loss"]) for r in rows] == [(10, 0.5)]


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from tracker_eval.loggers.base import LoggerContext
    from tracker_eval.evaluation.result import EvalResult
    from tracker_eval_wandb.logger import WandbConfig, WandbLogger
    out = sys.argv[1]
    logger = WandbLogger(WandbConfig(mode="offline"), context=LoggerContext(output_dir=out, run_key="kill"))
    logger.log_config({"model": "mlp", "note": "config"})
    for step in (300, 100):
        logger.log_result(EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": step / 1000},
                                     per_example={"loss": np.ones(3)}))
    logger.flush()
    print("flushed", flush=True)
    # Not delivered: logged but never flushed before the kill.
    logger.log_result(EvalResult(step=500, checkpoint="/ckpt/500", metrics={"loss": 0.5}))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_flushed_rows_survive_sigkill_and_secret_is_never_written(tmp_path):
    # The child must own its wandb-core: an inherited WANDB_SERVICE would make it share this
    # process's service, which then keeps the killed child's run id "in use".
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["WANDB_API_KEY"] = SECRET
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True,
                           timeout=120, env=env)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert "flushed" in child.stdout
    wandb_dir = tmp_path / "wandb"
    run_id = derive_run_id("kill")
    assert {100, 300} <= reader.held_steps(wandb_dir, run_id)
    rows = {r["checkpoint_step"]: r["eval/loss"] for r in reader.read_history(wandb_dir, run_id)}
    assert rows[300] == 0.3 and rows[100] == 0.1
    # The unflushed step is re-sent by the next process: delivery is at-least-once, then idempotent.
    logger = WandbLogger(WandbConfig(mode="offline"), context=LoggerContext(output_dir=str(tmp_path), run_key="kill"))
    for step in (100, 300, 500):
        logger.log_result(_result(step, step / 1000))
    logger.close()
    steps = sorted(r["checkpoint_step"] for r in reader.read_history(wandb_dir, run_id))
    assert steps.count(100) == 1 and steps.count(300) == 1 and steps.count(500) == 1

    secret = SECRET.encode()
    assert secret not in child.stdout.encode() and secret not in child.stderr.encode()
    checked = 0  # files under the output dir, wandb/ included
    for root, _dirs, files in os.walk(tmp_path):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                assert secret not in f.read(), f"the API key was written to {path}"
            checked += 1
    assert checked > 5
