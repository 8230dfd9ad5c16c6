"""The ledger opened read-only, for `tracker-eval status`: nothing under ``output_dir`` is written.

    status = read_ledger("out", checkpoint_dir="/ckpt", config_hash="ab12", best=("loss", "min"))
    status.rows, status.best, status.heartbeat       # None instead when there is no ledger yet

A `Ledger` writes as it opens (a write probe, the stream row, logger and best reconciliation), so
reading through one would change what it reads. SQLite in WAL mode writes even for a plain reader
(it creates ``-wal`` and ``-shm`` beside the file), so the file is opened in whichever of three ways
writes nothing:

- no ``-wal`` file: no writer has the file open (the last one to close folds the WAL back into the
  file and removes it), so the file is complete and is read as ``immutable``, which creates
  nothing. A writer that appears meanwhile leaves a ``-wal`` or changes the file; the read is then
  done again the next way.
- a ``-wal`` file (a live writer, or one that was killed): ``mode=ro``, which sees every committed
  transaction through the shared-memory index. SQLite maintains that index (``-shm``) for every
  reader; the data (the file and its WAL) are never written.
- a read-only mount where ``-shm`` is missing, so SQLite cannot build that index: the file and its
  WAL are copied to a private temporary directory and read there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.best import best_of, read_best, tracked_metric
from tracker_eval.ledger.db import LEDGER_FILENAME, LedgerError
from tracker_eval.ledger.reads import StepReads
from tracker_eval.ledger.schema import SCHEMA_VERSION
from tracker_eval.locations import normalize_checkpoint_dir

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class LedgerStatus:
    """What one stream's ledger holds, read in one consistent snapshot.

    Attributes:
      rows: one dict per known step (`StepReads.rows`).
      best: the best (step, value) of the requested metric, or None.
      heartbeat: the latest watcher heartbeat (owner, unix time), or None.
    """

    rows: list[dict[str, Any]]
    best: tuple[int, float] | None
    heartbeat: tuple[str, float] | None


class LedgerView(StepReads):
    """`StepReads` over a connection that cannot write; built by `read_ledger`."""

    def __init__(self, conn: sqlite3.Connection, *, output_dir: Path, stream: int, run_stream: int | None = None,
                 suite: str = "") -> None:
        # Deliberately not LedgerStore.__init__: that one creates the directory and the stream row.
        self._view = conn
        self.output_dir = output_dir
        self._stream = stream
        self._run_stream = stream if run_stream is None else run_stream
        self.suite = suite

    def _conn(self) -> sqlite3.Connection:
        return self._view

    def close(self) -> None:
        self._view.close()

    def best_by(self, metric: str | None, mode: str) -> tuple[int, float] | None:
        """The best step by `metric`: the stored best when the ledger tracks that metric, else
        computed from the stored results (a status with another `watch.best` changes nothing)."""
        if metric is None:
            return None
        if tracked_metric(self._view, self._stream) == (metric, mode):
            return read_best(self._view, self._stream)
        return best_of(((r["step"], r["metrics"]) for r in self.rows()), metric=metric, mode=mode)


def read_ledger(
    output_dir: str | os.PathLike[str],
    *,
    checkpoint_dir: str | os.PathLike[str],
    config_hash: str,
    best: tuple[str, str] | None = None,
    busy_timeout_s: float = 30.0,
) -> LedgerStatus | None:
    """Reads one stream's steps, best step and heartbeat without writing anything.

    Args:
      output_dir: the directory holding ``ledger.sqlite``.
      checkpoint_dir: the stream's checkpoint directory (normalized like the ledger does).
      config_hash: the stream's eval-config hash.
      best: (metric, mode) whose best step to report, or None.
      busy_timeout_s: how long a read waits while a writer recovers the file.

    Returns:
      The status, or None when there is no ledger (or no such stream in it) yet.

    Raises:
      LedgerError: the file cannot be read, or has a schema this version cannot read.
    """
    def read(conn: sqlite3.Connection, stream: int) -> LedgerStatus:
        view = LedgerView(conn, output_dir=Path(output_dir), stream=stream)
        return LedgerStatus(rows=view.rows(), best=view.best_by(*best) if best else None,
                            heartbeat=view.last_heartbeat())

    return _read_stream(output_dir, checkpoint_dir=checkpoint_dir, config_hash=config_hash, read=read,
                        busy_timeout_s=busy_timeout_s)


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """What the ledger holds for every suite a run ever had, read in one consistent snapshot.

    Attributes:
      suites: suite name -> its rows (`StepReads.rows`): the configured suites in config order,
        then suites the ledger has from earlier configs (removed, or whose options changed).
      best: the best (step, value) of the requested suite's metric, or None.
      heartbeat: the latest watcher heartbeat (owner, unix time), or None.
    """

    suites: dict[str, list[dict[str, Any]]]
    best: tuple[int, float] | None
    heartbeat: tuple[str, float] | None


def read_run(
    output_dir: str | os.PathLike[str],
    *,
    checkpoint_dir: str | os.PathLike[str],
    run_hash: str,
    suites: dict[str, str],
    best: tuple[str, str, str] | None = None,
    busy_timeout_s: float = 30.0,
) -> RunStatus | None:
    """Reads every suite stream of a run (a config with suites) without writing anything.

    Args:
      output_dir: the directory holding ``ledger.sqlite``.
      checkpoint_dir: the run's checkpoint directory.
      run_hash: the run's hash (`EvalConfig.run_hash`).
      suites: configured suite name -> its stream hash (`EvalConfig.suite_hash`), config order.
      best: (suite, metric, mode) whose best step to report, or None.
      busy_timeout_s: how long a read waits while a writer recovers the file.

    Returns:
      The status, or None when there is no ledger (or no such run in it) yet.

    Raises:
      LedgerError: the file cannot be read, or has a schema this version cannot read.
    """
    def read(conn: sqlite3.Connection, run_stream: int) -> RunStatus:
        streams = conn.execute("SELECT stream_id, suite, config_hash FROM streams WHERE parent_id = ? "
                               "ORDER BY stream_id", (run_stream,)).fetchall()
        chosen: dict[str, int] = {}
        for stream, suite, config_hash in streams:
            # A configured suite reads its current stream; any other the newest it had.
            if suite in suites and suites[suite] != config_hash:
                continue
            chosen[suite] = stream
        order = [name for name in suites if name in chosen] + [n for n in chosen if n not in suites]
        views = {name: LedgerView(conn, output_dir=Path(output_dir), stream=chosen[name], run_stream=run_stream,
                                  suite=name) for name in order}
        best_value = None
        if best is not None and best[0] in views:
            best_value = views[best[0]].best_by(best[1], best[2])
        heartbeat = LedgerView(conn, output_dir=Path(output_dir), stream=run_stream).last_heartbeat()
        return RunStatus(suites={name: view.rows() for name, view in views.items()}, best=best_value,
                         heartbeat=heartbeat)

    return _read_stream(output_dir, checkpoint_dir=checkpoint_dir, config_hash=run_hash, read=read,
                        busy_timeout_s=busy_timeout_s)


def read_results(
    output_dir: str | os.PathLike[str],
    *,
    checkpoint_dir: str | os.PathLike[str],
    stream_hash: str,
    steps: Sequence[int],
    suite: tuple[str, str] | None = None,
    busy_timeout_s: float = 30.0,
) -> dict[int, EvalResult | None] | None:
    """The stored results of `steps` of one stream (or one suite of a run), per-example values and
    samples included, without writing anything. Only those steps' rows and files are read, however
    many steps the stream has.

    Args:
      output_dir: the directory holding ``ledger.sqlite``.
      checkpoint_dir: the stream's checkpoint directory.
      stream_hash: the stream's eval-config hash, or the run's hash (`EvalConfig.run_hash`) with `suite`.
      steps: the steps wanted.
      suite: (suite name, its stream hash) for a config with suites.
      busy_timeout_s: how long a read waits while a writer recovers the file.

    Returns:
      step -> its result (None where the step has none stored), or None when the ledger has no such
      stream or suite.

    Raises:
      LedgerError: the file cannot be read, or has a schema this version cannot read.
    """
    def read(conn: sqlite3.Connection, stream: int) -> dict[int, EvalResult | None] | None:
        if suite is not None:
            found = conn.execute("SELECT stream_id FROM streams WHERE parent_id = ? AND suite = ? AND config_hash = ?",
                                 (stream, *suite)).fetchone()
            if found is None:
                return None
            stream = found[0]
        view = LedgerView(conn, output_dir=Path(output_dir), stream=stream)
        return {step: view.result(step) for step in steps}

    return _read_stream(output_dir, checkpoint_dir=checkpoint_dir, config_hash=stream_hash, read=read,
                        busy_timeout_s=busy_timeout_s)


def _read_stream(
    output_dir: str | os.PathLike[str], *, checkpoint_dir: str | os.PathLike[str], config_hash: str,
    read: Callable[[sqlite3.Connection, int], T], busy_timeout_s: float,
) -> T | None:
    """`read(conn, stream_id)` of one stream, in one snapshot, without writing; None when there is
    no ledger, no schema yet or no such stream."""
    path = Path(output_dir) / LEDGER_FILENAME
    if not path.exists():
        return None
    key = (normalize_checkpoint_dir(checkpoint_dir), config_hash)

    def snapshot(conn: sqlite3.Connection) -> T | None:
        if not _schema_ready(conn, path):
            return None
        conn.execute("BEGIN")  # one snapshot for every query of `read`
        try:
            found = conn.execute(
                "SELECT stream_id FROM streams WHERE checkpoint_dir = ? AND config_hash = ?", key
            ).fetchone()
            return None if found is None else read(conn, found[0])
        finally:
            conn.execute("COMMIT")

    try:
        return _read_without_writing(path, snapshot, busy_timeout_s=busy_timeout_s)
    except sqlite3.Error as error:
        raise LedgerError(f"cannot read the ledger {path}: {error}") from error


def _read_without_writing(path: Path, read: Callable[[sqlite3.Connection], T], *, busy_timeout_s: float) -> T:
    wal = Path(f"{path}-wal")
    if not wal.exists():
        before = _identity(path)
        with _connect(f"file:{_quote(path)}?immutable=1", busy_timeout_s) as conn:
            result = read(conn)
        if not wal.exists() and _identity(path) == before:
            return result
    try:
        with _connect(f"file:{_quote(path)}?mode=ro", busy_timeout_s) as conn:
            return read(conn)
    except sqlite3.OperationalError:
        # A read-only mount without the shared-memory file: read a private copy instead.
        with tempfile.TemporaryDirectory(prefix="tracker-eval-ledger-") as tmp:
            copy = Path(tmp) / path.name
            shutil.copyfile(path, copy)
            if wal.exists():
                shutil.copyfile(wal, f"{copy}-wal")
            with _connect(f"file:{_quote(copy)}", busy_timeout_s) as conn:
                return read(conn)


@contextlib.contextmanager
def _connect(uri: str, busy_timeout_s: float) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA query_only = ON")
        yield conn
    finally:
        conn.close()


def _schema_ready(conn: sqlite3.Connection, path: Path) -> bool:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:  # being created right now
        return False
    if version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        raise LedgerError(
            f"the ledger {path} has schema version {version}, "
            + ("newer than this tracker-eval understands; upgrade tracker-eval"
               if newer else "older than this tracker-eval's; run `tracker-eval watch` once to upgrade it")
            + f" (this version reads {SCHEMA_VERSION}; status never changes the file)"
        )
    return True


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _quote(path: Path) -> str:
    # A file: URI: "?" and "#" in a directory name must not start the query or fragment.
    return str(path.absolute()).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
