"""`tracker-eval ledger copy`: a SQLite ledger's whole history moved into a real PostgreSQL database,
where the run goes on; copying again changes nothing; another history is refused, not merged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_postgres import PostgresServer

from tracker_eval.cli import main
from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.postgres_schema import TABLES
from tracker_eval.ledger.reads import StepState
from tracker_eval.ledger.steps import Ledger

pytest_plugins = ["fixtures_postgres"]

LOGGERS = ("jsonl", "mlflow")


def suite_ledger(out: Path, suite: str, *, url: str | None = None, config_hash: str | None = None) -> Ledger:
    # The run's stream is created after the first suite's, so it has the higher id.
    return Ledger(out, checkpoint_dir="/ckpt", config_hash=config_hash or f"suite-{suite}", run_hash="run",
                  suite=suite, loggers=LOGGERS, best_metric="loss", url=url)


def result(step: int, suite: str) -> EvalResult:
    return EvalResult(step=step, checkpoint=f"/ckpt/{step}", metrics={"loss": 1.0 / step}, suite=suite,
                      per_example={"loss": np.arange(3, dtype=np.float32) + step})


def write_history(out: Path) -> None:
    """Two suites: stored, delivered, undeliverable, in flight, failed, skipped and pending steps."""
    for suite in ("val", "test"):
        with suite_ledger(out, suite) as ledger:
            ledger.register([10, 20, 30, 40, 50])
            for step in (10, 20, 30):
                assert ledger.claim(step, owner="w") and ledger.record_metrics(result(step, suite), owner="w")
            assert ledger.claim(40, owner="w")
            ledger.mark_failed(40, "flaky", owner="w")
            ledger.mark_skipped(50, "policy latest")
            assert ledger.claim_logger("jsonl", owner="d") and ledger.claim_logger("mlflow", owner="d")
            for step in (10, 20, 30):
                ledger.mark_delivered(step, "jsonl", owner="d")
            ledger.mark_delivered(10, "mlflow", owner="d")
            ledger.mark_delivery_failed(20, "mlflow", "HTTP 400", owner="d", permanent=True)
            ledger.begin_delivery(30, "mlflow", owner="d")
            ledger.set_run_state("mlflow", {"run_id": "abc"})
            ledger.mark_summary_sent("mlflow", "best 10", owner="d")
            ledger.touch_heartbeat("watcher-1")


def view(ledger: Ledger) -> dict[str, object]:
    return {"rows": ledger.rows(), "best": ledger.best(), "version": ledger.suite_version,
            "run_state": ledger.get_run_state("mlflow"), "heartbeat": ledger.last_heartbeat(),
            "summary": ledger.summary_sent("mlflow"), "pending": ledger.pending_deliveries("mlflow"),
            "in_flight": ledger.in_flight_deliveries("mlflow")}


def config_file(root: Path, out: Path) -> Path:
    path = root / "watch.yaml"
    classification = "tracker_eval.tasks.classification"
    path.write_text(json.dumps({
        "checkpoint_dir": "/ckpt", "output_dir": str(out), "model": f"{classification}:make_model",
        "eval_function": f"{classification}:eval_function", "data": f"{classification}:make_eval_data",
        "batch_size": 8}))
    return path


def table_text(server: PostgresServer, url: str) -> dict[str, str]:
    database = url.rsplit("/", 1)[1]
    return {t: server.sql(f"SELECT string_agg(x::text, E'\\n' ORDER BY x::text) FROM {t} x", database=database)
            for t in TABLES}


def test_the_copied_run_goes_on_where_the_file_left_it(tmp_path: Path, postgres_server: PostgresServer,
                                                       postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    write_history(out)
    before = {suite: view(suite_ledger(out, suite)) for suite in ("val", "test")}
    assert main(["ledger", "copy", "--config", str(config_file(tmp_path, out)), "--to", postgres_url]) == 0
    said = capsys.readouterr().out
    assert "copied" in said and "10 steps" in said and "3 streams" in said, said
    elsewhere = tmp_path / "another-machine"  # the results moved into the database: no shared disk needed
    for suite in ("val", "test"):
        with suite_ledger(elsewhere, suite, url=postgres_url) as ledger:
            assert view(ledger) == before[suite], suite
            for step in (10, 20, 30):
                assert ledger.result(step).per_example["loss"].tolist() == [step, step + 1.0, step + 2.0]
            # The run goes on: a failed step is claimed again, counting its earlier attempt.
            assert ledger.claim(40, owner="w2") and ledger.rows()[3]["attempts"] == 2
            assert ledger.state(50) is StepState.SKIPPED and ledger.due_deliveries("mlflow") == [30]
    # A stream the file never had gets an id after the copied ones.
    with suite_ledger(out, "new", url=postgres_url) as ledger:
        assert ledger.register([10]) == [10] and ledger.suite_version == 1


def test_copying_again_changes_nothing_and_another_history_is_refused(
        tmp_path: Path, postgres_server: PostgresServer, postgres_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    write_history(out)
    config = config_file(tmp_path, out)
    assert main(["ledger", "copy", "--config", str(config), "--to", postgres_url]) == 0
    copied = table_text(postgres_server, postgres_url)
    capsys.readouterr()
    assert main(["ledger", "copy", "--config", str(config), "--to", postgres_url]) == 0
    assert "nothing to copy" in capsys.readouterr().out
    assert table_text(postgres_server, postgres_url) == copied

    other = tmp_path / "other"
    with suite_ledger(other, "val", config_hash="another-config") as ledger:
        ledger.register([10])
    code = main(["ledger", "copy", "--config", str(config_file(tmp_path, other)), "--to", postgres_url])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "already holds another history" in err and "Copy into an empty database" in err, err
    assert table_text(postgres_server, postgres_url) == copied


def test_copy_errors_are_one_line(tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, tmp_path / "empty")
    assert main(["ledger", "copy", "--config", str(config), "--to", postgres_url]) == 2
    assert "no SQLite ledger in output_dir" in capsys.readouterr().err
    write_history(tmp_path / "empty")
    secret = "Copy-pw-5150"
    assert main(["ledger", "copy", "--config", str(config), "--to", f"mysql://u:{secret}@db/x"]) == 2
    err = capsys.readouterr().err
    assert "--to=" in err and "not a PostgreSQL URL" in err and secret not in err, err
