"""MLflow logger against a real ``mlflow server`` on loopback."""

from __future__ import annotations

import time

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from slow_proxy import SlowProxy
from tracker_eval_mlflow.logger import MlflowConfig, MlflowLogger, sanitize_key

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import LoggerContext
from tracker_eval.loggers.failures import FailureKind, classify
from tracker_eval.loggers.fanout import FanOut
from tracker_eval.loggers.jsonl import JsonlLogger, read_jsonl

pytest_plugins = ["fixtures_mlflow"]


def _logger(url: str, tmp_path, run_key: str, **options) -> MlflowLogger:
    context = LoggerContext(output_dir=str(tmp_path), run_key=run_key)
    return MlflowLogger(MlflowConfig(tracking_uri=url, **options), context=context, name="mlflow")


def _result(step: int, metrics: dict[str, float], **kwargs) -> EvalResult:
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics=metrics, **kwargs)


def test_out_of_order_steps_kept_and_resend_not_duplicated(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    logger = _logger(mlflow_server.url, tmp_path, "order-test")
    logger.log_config({"model": "mlp", "data": {"split": "test"}})
    logger.log_result(_result(300, {"loss": 0.25, "bad": float("nan")},
                              per_example={"loss": np.array([0.5, 0.0])}, provenance={"host": "h"}))
    logger.log_result(_result(100, {"loss": 0.75}))
    logger.set_summary({"best_step": 300, "best/loss": 0.25})
    logger.flush()
    run_id = logger.run_state()["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server.url)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss"))
    assert history == [(100, 0.75), (300, 0.25)]
    assert client.get_metric_history(run_id, "eval/bad") == []  # nan_policy: skip
    run = client.get_run(run_id)
    assert run.data.params["data.split"] == "test"
    assert run.data.tags["tracker_eval.summary.best_step"] == "300"
    artifacts = [a.path for a in client.list_artifacts(run_id, "per_example")]
    assert artifacts == ["per_example/step_300.npz"]

    # A restarted logger (same run key, no remembered state) finds the same run and does not re-send.
    again = _logger(mlflow_server.url, tmp_path, "order-test")
    again.log_result(_result(300, {"loss": 0.25}))
    again.log_result(_result(100, {"loss": 0.75, "acc": 0.5}))
    again.close()
    assert again.run_state()["run_id"] == run_id
    assert len(client.get_metric_history(run_id, "eval/loss")) == 2
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/acc")] == [(100, 0.5)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_alert_is_a_tag_and_a_value_at_its_step_once(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    alert = {"suite": "val", "metric": "loss", "step": 300, "reference_step": 100, "diff": 0.125,
             "message": "step 300 is worse than step 100 (best) on val/loss"}
    result = _result(300, {"loss": 0.875}, suite="val", alerts=(alert,))
    logger = _logger(mlflow_server.url, tmp_path, "alert-test")
    logger.log_result(result)
    logger.close()
    again = _logger(mlflow_server.url, tmp_path, "alert-test")  # a restart resends the step
    again.log_result(result)
    again.close()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = logger.run_state()["run_id"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/val/alerts/loss")] == [(300, 0.125)]
    tags = client.get_run(run_id).data.tags
    assert tags["tracker_eval.alert.eval/val/alerts/loss.step_300"] == alert["message"]


def test_a_send_stored_but_answered_late_is_not_stored_twice(mlflow_server, tmp_path):
    """The server stores a batch, its answer misses the client's timeout, MLflow's HTTP layer retries
    the POST and the delivery is attempted again later: the run still holds one point per step,
    because a result keeps its own timestamp and MLflow drops an identical (key, step, time, value)."""
    from mlflow.tracking import MlflowClient

    proxy = SlowProxy(mlflow_server.url, delay_s=0.0).start()
    try:
        logger = _logger(proxy.url, tmp_path, "late-answer", timeout_s=1, max_retries=1)
        logger.log_result(_result(1, {"loss": 1.0}))
        late = _result(2, {"loss": 0.5})
        proxy.answer_late_s = 2.5
        requests_before = proxy.requests
        with pytest.raises(MlflowException):
            logger.log_result(late)
        assert proxy.requests - requests_before >= 2, "the POST was not retried"
        proxy.answer_late_s = 0.0
        logger.log_result(late)  # the outbox's next attempt: same result, same timestamp
        logger.close()
    finally:
        proxy.stop()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    history = sorted((m.step, m.value) for m in client.get_metric_history(logger.run_state()["run_id"], "eval/loss"))
    assert history == [(1, 1.0), (2, 0.5)]


def test_default_store_keeps_artifacts_under_output_dir(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's own default would write ./mlruns here
    out = tmp_path / "out"
    logger = MlflowLogger(context=LoggerContext(output_dir=str(out), run_key="artifacts"), name="mlflow")
    logger.log_result(_result(5, {"loss": 0.1}, per_example={"loss": np.array([0.1, 0.2])}, provenance={"h": "x"}))
    logger.close()
    assert list(elsewhere.iterdir()) == []
    stored = sorted(p.relative_to(out).as_posix() for p in out.rglob("step_5.*"))
    assert len(stored) == 2 and all(p.startswith("mlflow-artifacts/") for p in stored), stored
    client = MlflowClient(tracking_uri=logger.tracking_uri)
    run_id = logger.run_state()["run_id"]
    assert [a.path for a in client.list_artifacts(run_id, "per_example")] == ["per_example/step_5.npz"]
    with np.load(client.download_artifacts(run_id, "per_example/step_5.npz", str(tmp_path))) as arrays:
        np.testing.assert_array_equal(arrays["loss"], [0.1, 0.2])


def test_credentials_in_the_config_never_reach_the_trackers(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from tracker_eval.config import load_config
    from tracker_eval.loggers.session import LoggerSession

    secret = "s3cret-0123456789"
    url = mlflow_server.url.replace("http://", f"http://alice:{secret}@")
    path = tmp_path / "c.yaml"
    path.write_text(
        "checkpoint_dir: /ckpts\nmodel: m:f\neval_function: m:e\ndata: m:d\nbatch_size: 8\n"
        f"output_dir: {tmp_path / 'out'}\n"
        f"model_kwargs: {{api_key: {secret}, tokenizer: bytes}}\n"
        f"loggers: [{{type: mlflow, tracking_uri: '{url}', experiment: redact}}, {{type: wandb, mode: offline}}]\n"
    )
    config = load_config(path)
    session = LoggerSession.open(config)  # records the config as run params / run config
    session.deliver(_result(1, {"loss": 1.0}))
    session.close()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.search_runs([client.get_experiment_by_name("redact").experiment_id])[0]
    params = run.data.params
    assert params["model_kwargs.tokenizer"] == "bytes" and params["model_kwargs.api_key"] == "***"
    assert "alice:" not in params["loggers"] and "***@127.0.0.1" in params["loggers"]
    assert not any(secret in value for value in params.values())
    for file in (tmp_path / "out").rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), f"{file} holds the secret"


def test_more_than_1000_metrics_are_chunked(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    logger = _logger(mlflow_server.url, tmp_path, "chunk-test")
    metrics = {f"m{i:04d}": float(i) for i in range(2100)}
    logger.log_result(_result(5, metrics))
    run_id = logger.run_state()["run_id"]
    held = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id).data.metrics
    assert len(held) == 2100 and held["eval/m2099"] == 2099.0


def test_a_result_the_server_refuses_is_permanent_and_keeps_its_type(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    logger = _logger(mlflow_server.url, tmp_path, "refused-test", nan_policy="error")
    fanout = FanOut([logger], deadline_s=60, on_error=lambda e: None)
    nan = fanout.deliver(_result(1, {"loss": float("nan")}))["mlflow"]
    assert nan is not None and nan.kind is FailureKind.PERMANENT and "NonFiniteMetricError" in str(nan)
    assert fanout.deliver(_result(2, {"loss": 0.5}))["mlflow"] is None
    fanout.close()
    MlflowClient(tracking_uri=mlflow_server.url).delete_run(logger.run_id)
    # Attached to a run deleted meanwhile: the server answers HTTP 400 to every write.
    again = _logger(mlflow_server.url, tmp_path, "refused-test", run_id=logger.run_id)
    with pytest.raises(MlflowException) as refused:
        again.log_result(_result(3, {"loss": 0.25}))
    assert refused.value.get_http_status_code() == 400, refused.value
    assert classify(refused.value) is FailureKind.PERMANENT


def test_nan_policy_error_and_key_sanitizing(mlflow_server, tmp_path):
    logger = _logger(mlflow_server.url, tmp_path, "nan-test", nan_policy="error")
    with pytest.raises(ValueError, match="'loss' at step 1 is nan"):
        logger.log_result(_result(1, {"loss": float("nan")}))
    assert sanitize_key("eval/acc@top-1 (%)") == "eval/acc_top-1 ___"
    assert len(sanitize_key("x" * 400)) == 250


def test_dead_server_fails_fast_and_others_get_every_result(tmp_path):
    from fixtures_mlflow import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    mlflow_logger = _logger(dead, tmp_path, "dead", timeout_s=2, max_retries=1)
    jsonl = JsonlLogger(context=LoggerContext(output_dir=str(tmp_path)))
    fanout = FanOut([mlflow_logger, jsonl], deadline_s=30, on_error=lambda e: None)
    start = time.monotonic()
    outcomes = [fanout.deliver(_result(step, {"loss": step / 10})) for step in (1, 2, 3)]
    elapsed = time.monotonic() - start
    assert all(o["jsonl"] is None for o in outcomes)
    assert all(o["mlflow"] is not None for o in outcomes)
    assert "Connection refused" in str(outcomes[0]["mlflow"]) or "Max retries" in str(outcomes[0]["mlflow"])
    # An outage: retried for as long as it lasts, never counted toward max_delivery_attempts.
    assert {o["mlflow"].kind for o in outcomes} == {FailureKind.UNAVAILABLE}
    assert elapsed < 30, f"three deliveries to a dead server took {elapsed:.1f} s"
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    fanout.close()


def test_server_stopped_then_restarted_resumes_delivery(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    logger = _logger(mlflow_server.url, tmp_path, "restart-test", timeout_s=2, max_retries=1)
    logger.log_result(_result(1, {"loss": 1.0}))
    mlflow_server.stop()
    try:
        start = time.monotonic()
        with pytest.raises(MlflowException):
            logger.log_result(_result(2, {"loss": 2.0}))
        down_cost = time.monotonic() - start
        print(f"call to a stopped mlflow server failed after {down_cost:.2f} s")
    finally:
        mlflow_server.start()
    assert down_cost < 15, f"a call to a stopped server took {down_cost:.1f} s"
    logger.log_result(_result(2, {"loss": 2.0}))
    history = MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(logger.run_id, "eval/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0)]


def test_per_example_summary_metrics_at_the_checkpoint_step(mlflow_server, tmp_path):
    rng = np.random.default_rng(7)
    per_step = {step: rng.lognormal(0.0, 1.0, size=1001) for step in (20, 10)}  # 10 arrives late
    logger = _logger(mlflow_server.url, tmp_path, "per-example-summary")
    for step, losses in per_step.items():
        with_nan = np.append(losses, [np.nan, np.inf]).astype(np.float32)  # non-finite rows are left out
        logger.log_result(_result(step, {"loss": float(losses.mean())}, per_example={"loss": with_nan}))
        logger.log_result(_result(step, {"loss": float(losses.mean())}, per_example={"loss": with_nan}))  # re-send
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    for step, losses in per_step.items():
        x = np.sort(losses.astype(np.float32).astype(np.float64))
        reference = {"count": x.size, "mean": x.sum() / x.size, "min": x[0], "max": x[-1],
                     "p05": np.percentile(x, 5), "p50": np.median(x), "p95": np.percentile(x, 95)}
        for stat, value in reference.items():
            history = client.get_metric_history(logger.run_id, f"eval/per_example/loss/{stat}")
            assert [m.step for m in history].count(step) == 1, stat
            (point,) = [m for m in history if m.step == step]
            assert point.value == pytest.approx(value, rel=1e-12), stat


# lm-eval's per-sample records as the harness suite hands them on (JSON-safe): nested lists, unicode,
# None, floats that must come back bit for bit, a task name that is not a safe file name.
SAMPLES = {
    "t_mc": [{"doc_id": i, "arguments": [["Q: 2+2?", f" {c}"] for c in "34"], "resps": [[[-0.1 - i / 3, False]]],
              "filtered_resps": [[-0.1 - i / 3, False]], "filter": "none", "metrics": ["acc"], "acc": float(i % 2)}
             for i in range(3)],
    "t_gen/x": [{"doc_id": 0, "resps": [["caf\u00e9 \u2603\n"]], "target": None, "exact_match": 0.0}],
}


def _read_samples(client, run_id: str, folder: str, tmp_path) -> dict[str, list[dict]]:
    """Every ``<task>.jsonl`` under `folder` of the run, parsed line by line."""
    import json

    out = {}
    for artifact in client.list_artifacts(run_id, folder):
        local = client.download_artifacts(run_id, artifact.path, str(tmp_path / "download"))
        with open(local) as f:
            out[artifact.path.rsplit("/", 1)[1]] = [json.loads(line) for line in f]
    return out


def test_samples_are_jsonl_artifacts_per_task_and_a_resend_does_not_duplicate(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from tracker_eval_mlflow.artifacts import log_step_artifacts

    logger = _logger(mlflow_server.url, tmp_path, "samples-test")
    first = _result(40, {"t_mc/acc": 1 / 3}, suite="harness", samples=SAMPLES)
    later = _result(50, {"t_mc/acc": 0.5}, suite="harness", samples={"t_mc": SAMPLES["t_mc"][:1]})
    logger.log_result(first)
    logger.log_result(_result(45, {"loss": 0.5}))  # a result without samples logs none
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = logger.run_state()["run_id"]
    # A process that died between the artifacts and the metrics of step 50, then a takeover that
    # re-sends steps 40 and 50 (both in flight): the files are replaced, never added to.
    log_step_artifacts(client, run_id, later)
    again = _logger(mlflow_server.url, tmp_path, "samples-test")
    again.reconcile({40: time.time(), 50: time.time()})
    again.log_result(first)
    again.log_result(later)
    again.close()

    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/harness"]
    assert [a.path for a in client.list_artifacts(run_id, "samples/harness")] == [
        "samples/harness/step_40", "samples/harness/step_50"]
    assert _read_samples(client, run_id, "samples/harness/step_40", tmp_path / "a") == {
        "t_gen_x.jsonl": SAMPLES["t_gen/x"], "t_mc.jsonl": SAMPLES["t_mc"]}
    assert _read_samples(client, run_id, "samples/harness/step_50", tmp_path / "b") == {
        "t_mc.jsonl": SAMPLES["t_mc"][:1]}
    (key,) = [k for k in client.get_run(run_id).data.metrics if k.endswith("t_mc/acc")]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) == [(40, 1 / 3), (50, 0.5)]


def test_a_sample_that_is_not_json_is_a_permanent_failure(mlflow_server, tmp_path):
    logger = _logger(mlflow_server.url, tmp_path, "bad-samples")
    bad = _result(1, {"acc": 1.0}, samples={"t": [{"x": float("inf")}]})
    with pytest.raises(ValueError, match="sample 0 of task 't' cannot be stored as JSON") as error:
        logger.log_result(bad)
    assert classify(error.value) is FailureKind.PERMANENT
