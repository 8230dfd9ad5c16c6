"""The stream's one MLflow run: found by its run-key tag or created, once, between processes.

    with run_lock(tracking_uri, run_key=key, ledger_url=None, output_dir="out"):
        run_id, experiment_id = find_or_create_run(client, experiment="eval", run_key=key,
                                                   run_name=None, tags={}, tracking_uri=tracking_uri)

MLflow has no "create if absent", so the lock is what keeps two processes of one stream (training's
`InTrainingEvaluation` beside a watcher, or watchers on several machines sharing a PostgreSQL
ledger) from creating a run each.
"""

from __future__ import annotations

import contextlib
import fcntl
import pathlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from tracker_eval.identity import tracker_run_name
from tracker_eval.ledger.mutex import run_mutex

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

RUN_KEY_TAG = "tracker_eval.run_key"


@contextlib.contextmanager
def run_lock(tracking_uri: str, *, run_key: str, ledger_url: str | None, output_dir: str) -> Iterator[None]:
    """Serializes finding or creating the stream's run between processes that share it.

    Two processes that search for the run's tag at once, find nothing and both create a run split
    one stream over two runs. The processes of a stream share its ledger, so the ledger's run-wide
    lock (`tracker_eval.ledger.mutex.run_mutex`: a file beside a SQLite ledger, an advisory lock in
    a PostgreSQL one, for processes on machines that share no disk) orders them: the first creates
    the run and the next one finds it. For an embedded ``sqlite:///`` store a file lock beside the
    database is taken too: its first use also creates and migrates the store, and two processes
    doing that at once break each other's migration ("duplicate column name", alembic version
    mismatches), whatever their output_dir.
    """
    with contextlib.ExitStack() as stack:
        if tracking_uri.startswith("sqlite:///"):
            path = pathlib.Path(f"{tracking_uri[len('sqlite:///'):]}.lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(path, "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        stack.enter_context(run_mutex(f"mlflow-run {tracking_uri} {run_key}", url=ledger_url, output_dir=output_dir))
        yield


def find_or_create_run(
    client: MlflowClient, *, experiment: str, run_key: str, run_name: str | None, tags: Mapping[str, Any],
    tracking_uri: str,
) -> tuple[str, str]:
    """(run id, experiment id) of the run tagged with `run_key`, created (with its experiment) if
    there is none; call it under `run_lock`."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_root(tracking_uri))
    quoted = run_key.replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{quoted}'", max_results=1)
    if runs:
        return runs[0].info.run_id, experiment_id
    all_tags = {RUN_KEY_TAG: run_key, **{k: str(v) for k, v in tags.items()}}
    name = run_name or tracker_run_name(run_key)
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id, experiment_id


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment of a local store keeps artifacts: beside the database file.

    MLflow's default for a sqlite store is ``./mlruns`` of the current directory, which scatters
    per-example arrays wherever the job happened to start (or fails in a read-only one). A server
    (http, https, databricks, ...) chooses its own artifact root.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = pathlib.Path(tracking_uri[len("sqlite:///") :])
    return (database.parent.absolute() / "mlflow-artifacts").as_uri()
