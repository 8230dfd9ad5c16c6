"""One stream's MLflow run opened by several processes at once, on the embedded store and on a server.

Training with `InTrainingEvaluation` and a watcher beside it open the stream's run at about the same
moment; an embedded store (``sqlite:///<output_dir>/mlflow.db``) is created and migrated once, and
every process attaches to one run (MLflow has no "create if absent": without a lock each process
that finds no run creates its own).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import uuid

import pytest
from watcher_harness import child_env, wait_for

pytest_plugins = ["fixtures_mlflow", "fixtures_postgres"]

CHILD = textwrap.dedent("""
    import os, pathlib, sys, time
    import mlflow.tracking
    from tracker_eval_mlflow.logger import MlflowConfig, MlflowLogger
    from tracker_eval.evaluation.result import EvalResult
    from tracker_eval.loggers.base import LoggerContext
    from tracker_eval.logs import configure_logging, quiet_environment

    quiet_environment()
    configure_logging(verbose=False)  # as the CLI and the demo's training process do
    out, step, uri = pathlib.Path(sys.argv[1]), int(sys.argv[2]), (sys.argv[3:] or [None])[0]
    (out / f"ready-{step}").touch()
    while not (out / "go").exists():  # every process imported mlflow: start together
        time.sleep(0.01)
    own = os.environ.get("OWN_OUTPUT_DIR")  # a machine of its own: no output_dir shared with the others
    context = LoggerContext(output_dir=str(out / f"machine-{step}") if own else str(out), run_key="ckpts@shared",
                            ledger_url=os.environ.get("LEDGER_URL"))
    logger = MlflowLogger(MlflowConfig(experiment=os.environ["EXPERIMENT"], tracking_uri=uri), name="mlflow",
                          context=context)
    logger.log_result(EvalResult(step=step, checkpoint=f"/ckpts/{step}", metrics={"loss": step / 100}))
    logger.close()
    print("done", logger.run_state()["run_id"], flush=True)
""")


# Reading the store back here (MlflowClient on sqlite) configures MLflow's SQLAlchemy mappers.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_processes_opening_a_fresh_embedded_store_at_once_share_one_migrated_store_and_run(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    run_id = _start_together(out, steps=[10, 20], experiment="shared-store")  # a training process and a watcher

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("shared-store")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss"))
    assert history == [(10, 0.1), (20, 0.2)]
    assert pathlib.Path(f"{out}/mlflow.db.lock").exists()


def test_processes_of_one_stream_starting_together_on_a_server_share_one_run(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    steps = [10, 20, 30, 40]
    run_id = _start_together(out, steps=steps, experiment="shared-server", uri=mlflow_server.url)

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("shared-server")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [run_id]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss"))
    assert history == [(step, step / 100) for step in steps]


def test_processes_on_machines_that_share_no_disk_share_one_run_through_the_postgresql_ledger(
        tmp_path, mlflow_server, postgres_url):
    from mlflow.tracking import MlflowClient

    steps = [10, 20, 30, 40]
    experiment = f"shared-no-disk-{uuid.uuid4().hex[:8]}"
    run_id = _start_together(tmp_path / "out", steps=steps, experiment=experiment, uri=mlflow_server.url,
                             env={"OWN_OUTPUT_DIR": "1", "LEDGER_URL": postgres_url})
    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [run.info.run_id for run in runs] == [run_id]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss"))
    assert history == [(step, step / 100) for step in steps]
    assert not list((tmp_path / "out").rglob("*.lock*")), "the lock is in the database, not a file"


def _start_together(out: pathlib.Path, *, steps: list[int], experiment: str, uri: str | None = None,
                    env: dict[str, str] | None = None) -> str:
    """Runs one logger process per step, released at one moment; the one run id they all used."""
    out.mkdir()
    env = {**child_env(devices=1), "EXPERIMENT": experiment, **(env or {})}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(step), *([uri] if uri else [])],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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
    return run_ids.pop()

