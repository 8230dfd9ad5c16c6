"""`tracker-eval status` and `status --health` never write: every file under output_dir stays byte-identical,
and every row of a PostgreSQL ledger stays as it was.

The ledger is a real one (real SQLite file in WAL mode, or a real PostgreSQL database:
`ledger_backends`), written by `Ledger` the way the watcher does; status runs as the real command,
with another logger list and another best metric than the writer's.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.identity import stream_hash
from tracker_eval.ledger import readonly, view
from tracker_eval.ledger.postgres_schema import TABLES
from tracker_eval.ledger.steps import Ledger

pytest_plugins = ["fixtures_postgres", "ledger_backends"]

EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
ROOT = pathlib.Path(__file__).resolve().parents[1]
# (step, loss, accuracy): loss is best (min) at 20, accuracy best (max) at 10 and 30 (a tie: 10 wins).
RESULTS = [(10, 0.9, 0.75), (20, 0.4, 0.5), (30, 0.6, 0.75)]


def _files(root: pathlib.Path) -> dict[str, str]:
    """Every file under `root`: relative path -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(server, url: str | None) -> dict[str, str]:
    """Every row of every ledger table of a PostgreSQL ledger, as text ({} for the SQLite file)."""
    if url is None:
        return {}
    database = url.rsplit("/", 1)[1]
    return {table: server.sql(f"SELECT string_agg(t::text, E'\\n' ORDER BY t::text) FROM {table} t", database=database)
            for table in TABLES}


def _config(tmp_path: pathlib.Path, url: str | None = None) -> pathlib.Path:
    ckpts = tmp_path / "ckpts"
    for step in (10, 20, 30, 40):
        (ckpts / str(step)).mkdir(parents=True)
    path = tmp_path / "watch.yaml"
    path.write_text(json.dumps({
        "checkpoint_dir": str(ckpts), "output_dir": str(tmp_path / "out"),
        "model": "tracker_eval.tasks.classification:make_model",
        "eval_function": "tracker_eval.tasks.classification:eval_function",
        "data": "tracker_eval.tasks.classification:make_eval_data", "batch_size": 64,
        "loggers": [{"type": "jsonl"}, {"type": "console"}],
        "watch": {"best": {"metric": "loss", "mode": "min"}},
        **({} if url is None else {"ledger": {"url": url}}),
    }))
    return path


def _writer_ledger(config_path: pathlib.Path) -> Ledger:
    """The ledger as the watcher of `config_path` opens it."""
    from tracker_eval.config import load_config, resolve_ledger_url

    config = load_config(config_path)
    return Ledger(config.output_dir, checkpoint_dir=config.checkpoint_dir, config_hash=stream_hash(config),
                  loggers=["jsonl", "console"], best_metric="loss", best_mode="min",
                  url=resolve_ledger_url(config.ledger))


def _record(ledger: Ledger, step: int, loss: float, accuracy: float) -> None:
    assert ledger.claim(step, owner="writer")
    result = EvalResult(step=step, checkpoint=f"/ckpts/{step}", metrics={"loss": loss, "accuracy": accuracy},
                        per_example={"loss": np.full(4, loss, np.float32)})
    assert ledger.record_metrics(result, owner="writer")


def _status(config: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Another logger list and another best metric than the writer's: each would make a Ledger
    # queue deliveries for the new loggers and recompute the stored best.
    overrides = ["loggers=[{type: jsonl}, {type: wandb, mode: offline}]", "watch.best={metric: accuracy, mode: max}"]
    return subprocess.run([EXE, "status", "--config", str(config), *args, *overrides], capture_output=True,
                          text=True, timeout=120, cwd=str(config.parent))


def test_status_and_health_leave_every_file_byte_identical(tmp_path, ledger_url, request):
    server = request.getfixturevalue("postgres_server") if ledger_url else None
    config = _config(tmp_path, ledger_url)
    out = tmp_path / "out"
    with _writer_ledger(config) as ledger:
        for step, loss, accuracy in RESULTS:
            _record(ledger, step, loss, accuracy)
        assert ledger.claim_logger("jsonl", owner="writer")
        ledger.mark_delivered(10, "jsonl", owner="writer")
        ledger.touch_heartbeat("writer")
    before, rows_before = _files(out), _rows(server, ledger_url)
    in_file = {"ledger.sqlite", "results"} if ledger_url is None else set()  # PostgreSQL: results in the database
    assert {name.split("/")[0] for name in before} == in_file
    assert ledger_url is None or "10" in rows_before["steps"] and "deliver:jsonl" in rows_before["leases"]

    as_json = _status(config, "--json")
    table = _status(config)
    health = _status(config, "--health")
    assert _files(out) == before
    assert _rows(server, ledger_url) == rows_before

    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert [s["step"] for s in doc["steps"]] == [10, 20, 30]
    # Deliveries as the writer left them: no row for the status's wandb, console still pending.
    assert [s["deliveries"] for s in doc["steps"]] == [
        {"console": "pending", "jsonl": "delivered"}, {"console": "pending", "jsonl": "pending"},
        {"console": "pending", "jsonl": "pending"}]
    # The best by the status's own metric, from the stored results (float64 reference by hand).
    accuracies = {step: accuracy for step, _, accuracy in RESULTS}
    top = max(accuracies.values())
    best = {"step": min(s for s, a in accuracies.items() if a == top), "value": top}
    assert {key: doc["best"][key] for key in best} == best
    # The stored arrays are not `example_accuracy`: nothing to test the best against its runner-up with.
    assert doc["best"]["runner_up"] == {"step": 30, "value": top} and doc["best"]["significant"] is None
    assert doc["newest_step"] == 40 and doc["lag_steps"] == 10
    assert table.returncode == 0 and "best: step 10" in table.stdout, table.stderr
    assert health.returncode == 0 and health.stdout.startswith("healthy"), (health.stdout, health.stderr)
    # The writer's own view is unchanged too: its best is still by loss.
    with _writer_ledger(config) as ledger:
        assert ledger.best() == (20, 0.4)


def _kill_writer_mid_run(config: pathlib.Path, step: int) -> None:
    """A writer process that stores `step` and dies without closing: its WAL stays beside the file."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_status_readonly import _record, _writer_ledger
        import pathlib
        ledger = _writer_ledger(pathlib.Path({str(config)!r}))
        _record(ledger, {step}, 0.3, 0.9)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _read(config: pathlib.Path):
    from tracker_eval.config import load_config

    loaded = load_config(config)
    return view.read_ledger(loaded.output_dir, checkpoint_dir=loaded.checkpoint_dir,
                            config_hash=stream_hash(loaded), best=("loss", "min"))


def test_wal_of_a_killed_writer_is_read_and_never_written(tmp_path, monkeypatch):
    config = _config(tmp_path)
    out = tmp_path / "out"
    with _writer_ledger(config) as ledger:
        _record(ledger, 10, 0.9, 0.75)
    _kill_writer_mid_run(config, 20)
    assert (out / "ledger.sqlite-wal").exists()  # step 20 lives only in the WAL

    data = ("ledger.sqlite", "ledger.sqlite-wal")
    before = _files(out)
    status = _read(config)  # mode=ro through the shared-memory index
    assert [(r["step"], str(r["state"])) for r in status.rows] == [(10, "evaluated"), (20, "evaluated")]
    assert status.best == (20, 0.3)
    after = _files(out)
    assert sorted(after) == sorted(before) and {k: after[k] for k in data} == {k: before[k] for k in data}

    # A read-only mount without the shared-memory file: SQLite refuses mode=ro, as it does there;
    # the private copy sees the WAL's transactions all the same and nothing here changes at all.
    opened = []
    real_connect = readonly._connect

    def read_only_mount(uri, busy_timeout_s):
        opened.append(uri.partition("?")[2] or "copy")
        if "mode=ro" in uri:
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(uri, busy_timeout_s)

    monkeypatch.setattr(readonly, "_connect", read_only_mount)
    before = _files(out)
    status = _read(config)
    assert opened == ["mode=ro", "copy"]
    assert [(r["step"], str(r["state"])) for r in status.rows] == [(10, "evaluated"), (20, "evaluated")]
    assert _files(out) == before


def test_a_writer_starting_during_an_immutable_read_is_seen(tmp_path):
    config = _config(tmp_path)
    with _writer_ledger(config) as ledger:
        _record(ledger, 10, 0.9, 0.75)
    path = tmp_path / "out" / "ledger.sqlite"
    assert not pathlib.Path(f"{path}-wal").exists()
    calls, writers = [], []

    def read(conn: sqlite3.Connection) -> list[int]:
        steps = [step for (step,) in conn.execute("SELECT step FROM steps ORDER BY step")]
        if not calls:  # a watcher starts and commits while the first (immutable) read runs
            writers.append(_writer_ledger(config))
            _record(writers[0], 20, 0.5, 0.5)
        calls.append(steps)
        return steps

    try:
        assert readonly._read_without_writing(path, read, busy_timeout_s=5.0) == [10, 20]
    finally:
        for writer in writers:
            writer.close()
    assert calls == [[10], [10, 20]]


def test_a_newer_schema_is_a_one_line_error(tmp_path, ledger_url):
    config = _config(tmp_path, ledger_url)
    with _writer_ledger(config) as ledger:
        ledger._conn().execute("PRAGMA user_version = 99" if ledger_url is None
                               else "UPDATE schema_version SET version = 99")
    proc = _status(config, "--json")
    assert proc.returncode == 2
    assert "schema version 99" in proc.stderr and "upgrade tracker-eval" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--json"], ["--health"]])
def test_status_before_any_ledger_creates_nothing(tmp_path, args, ledger_url, request):
    config = _config(tmp_path, ledger_url)
    proc = _status(config, *args)
    assert proc.returncode == (0 if args == ["--json"] else 1), proc.stderr
    assert not (tmp_path / "out").exists()
    if ledger_url is not None:
        server = request.getfixturevalue("postgres_server")
        assert server.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                          database=ledger_url.rsplit("/", 1)[1]) == "0"
