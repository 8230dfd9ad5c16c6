"""Browsing the eval run in the MLflow UI (same server) with headless Chromium."""

from __future__ import annotations

import pathlib
import subprocess

from browser import BROWSER_FLAGS, chromium, dump_dom
from tracker_eval_mlflow.logger import MlflowConfig, MlflowLogger

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import LoggerContext

pytest_plugins = ["fixtures_mlflow"]

ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "test-artifacts"


def test_eval_run_metrics_show_in_mlflow_ui(mlflow_server, tmp_path):
    browser = chromium()
    context = LoggerContext(output_dir=str(tmp_path), run_key="ui-browse")
    logger = MlflowLogger(MlflowConfig(tracking_uri=mlflow_server.url, experiment="ui-browse"), context=context)
    for step, loss in ((100, 0.9), (300, 0.4), (200, 0.6)):
        logger.log_result(EvalResult(step=step, checkpoint=f"/ckpt/{step}",
                                     metrics={"loss": loss, "accuracy_top1": 1 - loss}))
    state = logger.run_state()
    logger.close()
    url = f"{mlflow_server.url}/#/experiments/{state['experiment_id']}/runs/{state['run_id']}/model-metrics"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow_eval_run_metrics.png"
    screenshot.unlink(missing_ok=True)
    profile = tmp_path / "chromium-profile"
    dom = dump_dom(url, profile=profile)
    assert "eval/loss" in dom and "eval/accuracy_top1" in dom, dom[-3000:]
    shot = subprocess.run(
        [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
         f"--screenshot={screenshot}", url],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
