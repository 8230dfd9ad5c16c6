"""Helpers for the watcher's real-process tests: configs, subprocesses, ledger polling, tracker read-back.

The watcher runs as `tracker-eval watch` in its own process group; tests wait on what the ledger
(or the watcher's own log lines) says, with a bound, and read every tracker's own records at the end.

    pytest_plugins = ["fixtures_mlflow", "watcher_harness"]

    def test_x(tmp_path, source_checkpoints):
        config = write_config(tmp_path, watch={"until_step": 40})
        publish(source_checkpoints, tmp_path / "ckpts", 20)
        with WatcherProcess(config) as watcher:
            wait_for(lambda: ledger_state(tmp_path / "out", 20) == "delivered", timeout=60, what="step 20")
            ...

`slow_eval_data` is also imported by the watcher child (``data: watcher_harness:slow_eval_data``):
it makes each evaluation last long enough to be killed or signalled mid-way.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
EXE = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
CLASSIFICATION = "tracker_eval.tasks.classification"
SOURCE_STEPS = (20, 40, 60, 80, 100, 120)
METRICS = ("accuracy", "loss")

T = TypeVar("T")


def slow_eval_data(
    *, split: str, batch_size: int, process_index: int = 0, process_count: int = 1, delay_s: float = 0.0
) -> Iterator[dict[str, Any]]:
    """The digits eval data, each batch handed out `delay_s` late (a slow input pipeline)."""
    from tracker_eval.tasks.classification import make_eval_data  # noqa: PLC0415 - child-side import

    for batch in make_eval_data(split=split, batch_size=batch_size, process_index=process_index,
                                process_count=process_count):
        time.sleep(delay_s)
        yield batch


def child_env(*, devices: int = 2) -> dict[str, str]:
    """Environment of a child process: few fake CPU devices, offline W&B with its own wandb-core."""
    # An inherited WANDB_SERVICE would make the child share this process's wandb-core.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p),
    )
    return env


def write_config(
    root: pathlib.Path,
    *,
    watch: Mapping[str, Any],
    loggers: Sequence[Mapping[str, Any]] = ({"type": "jsonl"},),
    delay_s: float = 0.0,
    checkpoint_dir: pathlib.Path | None = None,
    output_dir: pathlib.Path | None = None,
    name: str = "watch.yaml",
) -> pathlib.Path:
    """Writes a watch config for the digits classifier (JSON, which is YAML) and returns its path.

    Args:
      root: directory of the config; checkpoints default to ``root/ckpts``, output to ``root/out``.
      watch: the ``watch:`` block.
      loggers: logger specs.
      delay_s: per-batch delay of the eval data on every evaluation (cache off; 0 = the plain
        classification data, cached).
      checkpoint_dir: overrides ``root/ckpts``.
      output_dir: overrides ``root/out``.
      name: file name of the config.

    Returns:
      The config path.
    """
    config: dict[str, Any] = {
        "checkpoint_dir": str(checkpoint_dir or root / "ckpts"),
        "model": f"{CLASSIFICATION}:make_model",
        "eval_function": f"{CLASSIFICATION}:eval_function",
        "data": f"{CLASSIFICATION}:make_eval_data",
        "batch_size": 64,
        "output_dir": str(output_dir or root / "out"),
        "watch": dict(watch),
        "loggers": [dict(spec) for spec in loggers],
    }
    if delay_s:
        config["data"] = "watcher_harness:slow_eval_data"
        config["data_kwargs"] = {"delay_s": delay_s}
        # Slow on every evaluation, as tests that act mid-evaluation need: the default host cache
        # would replay the second and later evaluations at once.
        config["cache"] = "none"
    path = root / name
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class WatcherProcess:
    """`tracker-eval watch` (or another tracker-eval command) as a subprocess in its own process group.

    Every output line is kept with the wall time it arrived, so tests and the benchmark can wait on
    log lines and time them. Use as a context manager: leaving it SIGKILLs whatever still runs.

    Args:
      config: the config file.
      command: the tracker-eval subcommand.
      devices: fake CPU devices of the child.
    """

    def __init__(self, config: pathlib.Path, *, command: str = "watch", devices: int = 2) -> None:
        self.config = config
        self.command = command
        self.devices = devices
        self.lines: list[tuple[float, str]] = []
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.started_at = 0.0

    def start(self) -> WatcherProcess:
        """Starts the child; returns self."""
        self.started_at = time.time()
        self.process = subprocess.Popen(
            [EXE, self.command, "--config", str(self.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=child_env(devices=self.devices), start_new_session=True, cwd=str(self.config.parent),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> WatcherProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill9()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def tail(self, n: int = 30) -> str:
        return "".join(line for _, line in self.lines[-n:])

    def evaluated_steps(self) -> list[int]:
        """Steps this process started evaluating, in order (from its "evaluating step N" lines)."""
        return [int(m.group(1)) for _, line in self.lines if (m := re.search(r"evaluating step (\d+)$", line.strip()))]

    def line_time(self, pattern: str) -> float | None:
        """Arrival time of the first output line matching `pattern`, or None."""
        regex = re.compile(pattern)
        return next((t for t, line in list(self.lines) if regex.search(line)), None)

    def wait_exit(self, timeout: float) -> int:
        """Waits for the child to exit; fails the test with its output tail when it does not."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"watcher still running after {timeout:g} s; output tail:\n{self.tail()}") from None
        if self._reader is not None:
            self._reader.join(5)
        return code

    def signal(self, signum: int) -> None:
        """Sends `signum` to the watcher process itself (not its group)."""
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill9(self) -> None:
        """SIGKILLs the whole process group (the watcher and its wandb-core), as a crash would."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self._reader is not None:
            self._reader.join(5)

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.time(), line))


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float,
    what: str,
    watchers: Sequence[WatcherProcess] = (),
    interval: float = 0.05,
) -> T:
    """Polls `predicate` until it returns something truthy, which is returned.

    Raises:
      AssertionError: after `timeout` seconds, or at once when one of `watchers` exited meanwhile;
        the message has the watchers' output tails.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        exited = [w for w in watchers if w.returncode is not None]
        if exited or time.monotonic() > deadline:
            why = f"watcher exited with {exited[0].returncode}" if exited else f"timed out after {timeout:g} s"
            tails = "\n".join(f"--- watcher {w.pid}:\n{w.tail()}" for w in watchers)
            raise AssertionError(f"{why} waiting for {what}\n{tails}")
        time.sleep(interval)


def _ledger_tables(output_dir: pathlib.Path) -> tuple[list[Any], list[Any]] | None:
    """(steps, outbox) rows of the ledger: ``output_dir/ledger.sqlite``, or the PostgreSQL database that
    TRACKER_EVAL_LEDGER_URL names (`ledger_backends.ledger_backend`); None before it has a schema."""
    queries = ("SELECT step, state, reason, attempts, owner, result_json FROM steps ORDER BY step",
               "SELECT step, logger, state, delivered_at FROM outbox")
    url = os.environ.get("TRACKER_EVAL_LEDGER_URL")
    if url:
        assert not (output_dir / "ledger.sqlite").exists(), "a SQLite ledger beside a PostgreSQL one"
        from tracker_eval.ledger.postgres import PostgresConnection, open_connection  # noqa: PLC0415
        from tracker_eval.ledger.postgres_schema import schema_version  # noqa: PLC0415

        database = PostgresConnection(open_connection(url, read_only=True))
        try:
            if schema_version(database) == 0:
                return None
            with database.read_snapshot():
                steps, outbox = (database.execute(query).fetchall() for query in queries)
                return list(steps), list(outbox)
        finally:
            database.close()
    path = output_dir / "ledger.sqlite"
    if not path.exists():
        return None
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        return conn.execute(queries[0]).fetchall(), conn.execute(queries[1]).fetchall()
    except sqlite3.OperationalError:  # the schema is being created right now
        return None
    finally:
        conn.close()


class LedgerBusy(Exception):
    """Another process holds the ledger's write lock (e.g. one stopped in the middle of a write)."""


def ledger_execute(output_dir: pathlib.Path, sql: str, *, timeout_s: float = 30.0) -> list[Any]:
    """Runs one statement on the ledger of either backend as one write transaction, as the ledger's
    own writes run (SQLite's BEGIN IMMEDIATE, PostgreSQL's write lock); returns its rows, if any.

    Raises:
      LedgerBusy: the write lock was not had within `timeout_s`.
    """
    url = os.environ.get("TRACKER_EVAL_LEDGER_URL")
    if url:
        import psycopg  # noqa: PLC0415

        from tracker_eval.ledger.postgres import PostgresConnection, open_connection  # noqa: PLC0415

        database = PostgresConnection(open_connection(url, read_only=False))
        try:
            database.execute(f"SET lock_timeout = '{int(timeout_s * 1000)}ms'")
            with database.write_transaction():
                cursor = database.execute(sql)
                return list(cursor.fetchall()) if cursor.description is not None else []
        except psycopg.errors.LockNotAvailable as error:
            raise LedgerBusy(str(error)) from None
        finally:
            database.close()
    conn = sqlite3.connect(str(output_dir / "ledger.sqlite"), timeout=timeout_s, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(sql).fetchall()
        conn.execute("COMMIT")
        return rows
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
            raise
        raise LedgerBusy(str(error)) from None
    finally:
        conn.close()


def ledger_rows(output_dir: pathlib.Path) -> dict[int, dict[str, Any]]:
    """Each known step of the (only) stream of the ledger (``output_dir/ledger.sqlite``, or the
    PostgreSQL database TRACKER_EVAL_LEDGER_URL names): state, reason, attempts, owner, metrics and
    ``deliveries`` ({logger: {"state", "delivered_at"}}); {} before the ledger exists."""
    from tracker_eval.ledger.files import decoded_metrics  # noqa: PLC0415

    tables = _ledger_tables(output_dir)
    if tables is None:
        return {}
    steps, outbox = tables
    rows = {
        step: {"state": state, "reason": reason, "attempts": attempts, "owner": owner,
               "metrics": {} if payload is None else decoded_metrics(payload), "deliveries": {}}
        for step, state, reason, attempts, owner, payload in steps
    }
    for step, logger, state, delivered_at in outbox:
        if step in rows:
            rows[step]["deliveries"][logger] = {"state": state, "delivered_at": delivered_at}
    return rows


def owner_pid(owner: str | None) -> int | None:
    """The pid inside a ledger owner id ("host:ns:pid:token"), or None."""
    if not owner:
        return None
    parts = owner.rsplit(":", 3)
    return int(parts[2]) if len(parts) == 4 and parts[2].isdigit() else None


def states(output_dir: pathlib.Path) -> dict[int, str]:
    """{step: state} of the ledger."""
    return {step: row["state"] for step, row in ledger_rows(output_dir).items()}


def publish(source: pathlib.Path, checkpoint_dir: pathlib.Path, step: int, *, as_step: int | None = None,
            staging: pathlib.Path | None = None) -> float:
    """Finalizes a copy of ``source/<step>`` in `checkpoint_dir` the way Orbax does: write, then rename.

    Args:
      source: a CheckpointManager root holding `step`.
      checkpoint_dir: the watched directory (created if missing).
      step: the source step.
      as_step: the step number in `checkpoint_dir` (default `step`).
      staging: write the copy here and rename it in from there (a step written elsewhere); default
        ``<checkpoint_dir>/<step>.orbax-checkpoint-tmp``, like Orbax itself.

    Returns:
      The wall time just after the finalizing rename.
    """
    target = as_step if as_step is not None else step
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = (staging or checkpoint_dir) / f"{target}.orbax-checkpoint-tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / str(step), tmp)
    os.rename(tmp, checkpoint_dir / str(target))
    return time.time()


def start_writer(checkpoint_dir: pathlib.Path, *, save_steps: Sequence[int], pause_s: float) -> subprocess.Popen[str]:
    """A training process (`train_classifier`) saving real checkpoints at `save_steps`, pausing after each."""
    code = (
        "import sys, time\n"
        "from tracker_eval.tasks.train import train_classifier\n"
        f"train_classifier(sys.argv[1], steps={max(save_steps)}, save_every=10**9, save_steps={list(save_steps)!r},\n"
        f"                 after_save=lambda step, state: time.sleep({pause_s!r}))\n"
        "print('writer done', flush=True)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(checkpoint_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env(devices=1), start_new_session=True)


def reference_metrics(checkpoint_dir: pathlib.Path, step: int) -> dict[str, float]:
    """Independent evaluation: a plain Orbax restore of the whole state and a float64 numpy forward pass."""
    from reference import restored_params, validation_metrics  # noqa: PLC0415

    losses, accuracy = validation_metrics(restored_params(checkpoint_dir, step))
    return {"loss": float(losses.mean()), "accuracy": accuracy}


def assert_equal_to_reference(stored: Mapping[int, Mapping[str, float]], checkpoint_dir: pathlib.Path,
                              steps: Sequence[int]) -> None:
    """Each step's stored loss and accuracy equal the float64 reference (`reference_metrics`)."""
    import pytest as _pytest  # noqa: PLC0415

    for step in steps:
        want = reference_metrics(checkpoint_dir, step)
        assert stored[step]["loss"] == _pytest.approx(want["loss"], rel=1e-5), step
        assert stored[step]["accuracy"] == _pytest.approx(want["accuracy"], rel=1e-9), step


def jsonl_points(output_dir: pathlib.Path) -> dict[int, list[dict[str, float]]]:
    """{step: [metrics of each line for that step]} from the JSONL logger's file."""
    from tracker_eval.loggers.jsonl import read_jsonl  # noqa: PLC0415

    points: dict[int, list[dict[str, float]]] = collections.defaultdict(list)
    for record in read_jsonl(output_dir / "metrics.jsonl"):
        points[int(record["step"])].append(record["metrics"])
    return dict(points)


def mlflow_run(url: str, experiment: str) -> Any:
    """The one run in `experiment` (fails when there is none or more than one)."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run in {experiment!r}, found {len(runs)}"
    return runs[0]


def mlflow_points(url: str, experiment: str) -> dict[str, list[tuple[int, float]]]:
    """{metric key: [(step, value), ...]} of every point the run's history holds."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=url)
    run = mlflow_run(url, experiment)
    return {key: [(int(m.step), float(m.value)) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics}


def wandb_run_id(output_dir: pathlib.Path) -> str:
    """The one W&B run id with offline-run directories under ``output_dir/wandb``."""
    ids = {m.group(1) for p in (output_dir / "wandb").glob("offline-run-*")
           if (m := re.match(r"offline-run-\d{8}_\d{6}-(.+?)(?:-\d+)?$", p.name))}
    assert len(ids) == 1, f"expected one W&B run id under {output_dir / 'wandb'}, found {sorted(ids)}"
    return ids.pop()


def wandb_rows(output_dir: pathlib.Path) -> list[dict[str, Any]]:
    """History rows of every offline-run directory of the run (one per process start and flush)."""
    from tracker_eval_wandb import reader  # noqa: PLC0415

    return reader.read_history(output_dir / "wandb", wandb_run_id(output_dir))


def wandb_summary(output_dir: pathlib.Path) -> dict[str, Any]:
    """The run summary merged from every summary update on disk."""
    from tracker_eval_wandb import reader  # noqa: PLC0415

    return reader.read_summary_updates(output_dir / "wandb", wandb_run_id(output_dir))


def stored_metrics(output_dir: pathlib.Path) -> dict[int, dict[str, float]]:
    """{step: metrics} of every step whose result the ledger stores."""
    return {step: row["metrics"] for step, row in ledger_rows(output_dir).items() if row["metrics"]}


def assert_exactly_once(
    output_dir: pathlib.Path,
    expected: Mapping[int, Mapping[str, float]],
    *,
    mlflow: tuple[str, str] | None = None,
    wandb: bool = False,
    prefix: str = "eval",
) -> None:
    """Every tracker holds exactly one point per (metric, step) of `expected`, with its value, and nothing else.

    Args:
      output_dir: the watcher's output directory (JSONL file, ``wandb/``).
      expected: {step: {metric: value}} (e.g. the ledger's stored results).
      mlflow: (tracking URL, experiment) when the MLflow logger was on.
      wandb: whether the W&B logger was on.
      prefix: the metric prefix in the trackers.
    """
    import pytest as _pytest  # noqa: PLC0415

    steps = sorted(expected)
    jsonl = jsonl_points(output_dir)
    assert sorted(jsonl) == steps, f"JSONL steps {sorted(jsonl)} != {steps}"
    for step in steps:
        assert len(jsonl[step]) == 1, f"JSONL has {len(jsonl[step])} lines for step {step}"
        assert jsonl[step][0] == _pytest.approx(dict(expected[step]), rel=1e-12)
    if mlflow is not None:
        history = mlflow_points(*mlflow)
        for metric in METRICS:
            points = history.get(f"{prefix}/{metric}", [])
            counts = collections.Counter(step for step, _ in points)
            assert sorted(counts) == steps and set(counts.values()) == {1}, (
                f"MLflow {prefix}/{metric}: points per step {dict(sorted(counts.items()))}, "
                f"want one for each of {steps}")
            for step, value in points:
                assert value == _pytest.approx(expected[step][metric], rel=1e-12), (metric, step)
    if wandb:
        rows = [r for r in wandb_rows(output_dir) if "checkpoint_step" in r]
        counts = collections.Counter(int(r["checkpoint_step"]) for r in rows)
        assert sorted(counts) == steps and set(counts.values()) == {1}, (
            f"W&B rows per checkpoint_step {dict(sorted(counts.items()))}, want one for each of {steps}")
        for row in rows:
            for metric in METRICS:
                want = expected[int(row["checkpoint_step"])][metric]
                assert row[f"{prefix}/{metric}"] == _pytest.approx(want, rel=1e-12)


@pytest.fixture(scope="session")
def source_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Real Orbax checkpoints of the digits classifier at `SOURCE_STEPS`, written once per session."""
    from tracker_eval.tasks.train import train_classifier  # noqa: PLC0415

    directory = tmp_path_factory.mktemp("watcher-source") / "ckpts"
    train_classifier(directory, steps=max(SOURCE_STEPS), save_every=20)
    return directory
