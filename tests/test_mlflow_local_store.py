"""The embedded MLflow store (``sqlite:///<output_dir>/mlflow.db``) used by several processes at once.

Training with `InTrainingEvaluation` and a watcher beside it both open the same embedded store the
first time at about the same moment; the store is created and migrated once, and both attach to one run.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest
from watcher_harness import child_env, wait_for

CHILD = textwrap.dedent("""
    import os, pathlib, sys, time
    import mlflow.tracking
    from tracker_eval_mlflow.logger import MlflowConfig, MlflowLogger
    from tracker_eval.evaluation.result import EvalResult
    from tracker_eval.loggers.base import LoggerContext
    from tracker_eval.logs import configure_logging, quiet_environment

    quiet_environment()
    configure_logging(verbose=False)  # as the CLI and the demo's training process do
    out, step = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    (out / f"ready-{step}").touch()
    while not (out / "go").exists():  # every process imported mlflow: start together
        time.sleep(0.01)
    logger = MlflowLogger(MlflowConfig(experiment="shared-store"), name="mlflow",
                          context=LoggerContext(output_dir=str(out), run_key="ckpts@shared"))
    logger.log_result(EvalResult(step=step, checkpoint=f"/ckpts/{step}", metrics={"loss": step / 100}))
    logger.close()
    print("done", logger.run_state()["run_id"], flush=True)
""")


# Reading the store back here (MlflowClient on sqlite) configures MLflow's SQLAlchemy mappers.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_processes_opening_a_fresh_embedded_store_at_once_share_one_migrated_store_and_run(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    out.mkdir()
    steps = [10, 20]  # a training process and a watcher
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(step)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=child_env(devices=1))
                for step in steps]
    try:
        wait_for(lambda: all((out / f"ready-{step}").exists() for step in steps) or any(
            c.poll() is not None for c in children), timeout=600, what="every process ready")
        assert not (out / "mlflow.db").exists()  # nobody has touched the store yet
        (out / "go").touch()
        results = [c.communicate(timeout=600) for c in children]  # bounds, not speeds
    finally:
        for child in children:
            child.kill()
    for child, (_, stderr) in zip(children, results, strict=True):
        assert child.returncode == 0, stderr[-3000:]
        assert stderr.strip() == "", stderr[-3000:]  # no alembic warning, no migration traceback
    run_ids = {stdout.split()[1] for stdout, _ in results}
    assert len(run_ids) == 1, run_ids

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("shared-store")
    (run,) = client.search_runs([experiment.experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss"))
    assert history == [(step, step / 100) for step in steps]
    assert pathlib.Path(f"{out}/mlflow.db.lock").exists()

