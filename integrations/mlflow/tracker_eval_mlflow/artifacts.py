"""The artifacts of one checkpoint step in an MLflow run: per-example arrays, provenance, samples.

    log_step_artifacts(client, run_id, result)
    # per_example/step_300.npz, provenance/step_300.json (step_300_<suite>.* for a suite's result),
    # samples/harness/step_300/my_mc.jsonl (one per task: lm-eval's per-sample records, a record a line)

Every path is a function of the step (and suite and task), so sending the same step again replaces
the files with the same content instead of adding copies.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING

from tracker_eval import EvalResult
from tracker_eval.evaluation.result import sample_file_name, samples_jsonl
from tracker_eval.identity import tracker_suite
from tracker_eval.loggers.failures import FailureKind, mark
from tracker_eval.npz import write_npz

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def samples_artifact_dir(result: EvalResult) -> str:
    """Where a step's per-sample records go: ``samples/<suite, or none>/step_<step>``."""
    return f"samples/{tracker_suite(result) or 'none'}/step_{int(result.step)}"


def log_step_artifacts(client: MlflowClient, run_id: str, result: EvalResult) -> None:
    """Logs what the result has of per-example arrays, provenance and per-sample records.

    Raises:
      ValueError: a sample that is not plain JSON (marked permanent: no retry can send it).
    """
    with tempfile.TemporaryDirectory(prefix="tracker-eval-mlflow-") as tmp:
        if result.per_example or result.provenance:
            base = os.path.join(tmp, f"step_{int(result.step)}" + (f"_{tracker_suite(result)}" if result.suite else ""))
            write_npz(base + ".npz", result.per_example, durable=False)
            with open(base + ".json", "w") as f:
                json.dump({"step": int(result.step), "checkpoint": result.checkpoint,
                           **({"suite": result.suite} if result.suite else {}),
                           "provenance": dict(result.provenance)}, f, default=str, sort_keys=True)
            client.log_artifact(run_id, base + ".npz", artifact_path="per_example")
            client.log_artifact(run_id, base + ".json", artifact_path="provenance")
        if result.samples:
            folder = os.path.join(tmp, "samples")
            os.mkdir(folder)
            taken: set[str] = set()
            for task, records in result.samples.items():
                try:
                    text = samples_jsonl(task, records)
                except ValueError as error:
                    mark(error, FailureKind.PERMANENT)
                    raise
                with open(os.path.join(folder, sample_file_name(task, taken=taken)), "w") as f:
                    f.write(text)
            client.log_artifacts(run_id, folder, artifact_path=samples_artifact_dir(result))
