"""Browsing the eval run in the MLflow UI (same server) with headless Chromium."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
from tracker_eval_mlflow.logger import MlflowConfig, MlflowLogger

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.loggers.base import LoggerContext

pytest_plugins = ["fixtures_mlflow"]

ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "test-artifacts"
BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail(
        "Chromium is needed to check the MLflow UI but is not installed. Install it with "
        "`apt-get update && apt-get install -y chromium` (as root; `make test` does this when it can)."
    )


def test_eval_run_metrics_show_in_mlflow_ui(mlflow_server, tmp_path):
    browser = _chromium()
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
    dom = subprocess.run(
        [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "eval/loss" in dom.stdout and "eval/accuracy_top1" in dom.stdout, dom.stdout[-3000:]
    shot = subprocess.run(
        [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
         f"--screenshot={screenshot}", url],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
