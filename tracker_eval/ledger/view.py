"""The ledger opened read-only, for `tracker-eval status`: nothing under ``output_dir``, nor in a
PostgreSQL ledger, is written.

    status = read_ledger("out", checkpoint_dir="/ckpt", config_hash="ab12", best=("loss", "min"))
    status.rows, status.best, status.heartbeat       # None instead when there is no ledger yet

It reads through `tracker_eval.ledger.readonly`, which says how a file is read without writing.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from tracker_eval.evaluation.result import EvalResult
from tracker_eval.ledger.best import best_of, read_best, tracked_metric
from tracker_eval.ledger.readonly import read_stream
from tracker_eval.ledger.reads import StepReads

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
    url: str | None = None,
) -> LedgerStatus | None:
    """Reads one stream's steps, best step and heartbeat without writing anything.

    Args:
      output_dir: the directory holding ``ledger.sqlite``.
      checkpoint_dir: the stream's checkpoint directory (normalized like the ledger does).
      config_hash: the stream's eval-config hash.
      best: (metric, mode) whose best step to report, or None.
      busy_timeout_s: how long a read waits while a writer recovers the file.
      url: a PostgreSQL ledger instead of the file in `output_dir` (`tracker_eval.config.ledger`).

    Returns:
      The status, or None when there is no ledger (or no such stream in it) yet.

    Raises:
      LedgerError: the file cannot be read, or has a schema this version cannot read.
    """
    def read(conn: sqlite3.Connection, stream: int) -> LedgerStatus:
        view = LedgerView(conn, output_dir=Path(output_dir), stream=stream)
        return LedgerStatus(rows=view.rows(), best=view.best_by(*best) if best else None,
                            heartbeat=view.last_heartbeat())

    return read_stream(output_dir, checkpoint_dir=checkpoint_dir, config_hash=config_hash, read=read,
                        busy_timeout_s=busy_timeout_s, url=url)


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """What the ledger holds for every suite a run ever had, read in one consistent snapshot.

    Attributes:
      suites: suite name -> its rows (`StepReads.rows`): the configured suites in config order,
        then what the ledger has from earlier configs: a removed suite's newest version under its
        name, and every other version of a suite as ``<suite>-v<N>`` (its N-th set of options).
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
    url: str | None = None,
) -> RunStatus | None:
    """Reads every suite stream of a run (a config with suites) without writing anything.

    Args:
      output_dir: the directory holding ``ledger.sqlite``.
      checkpoint_dir: the run's checkpoint directory.
      run_hash: the run's hash (`tracker_eval.identity.run_hash`).
      suites: configured suite name -> its stream hash (`tracker_eval.identity.suite_hash`), config order.
      best: (suite, metric, mode) whose best step to report, or None.
      busy_timeout_s: how long a read waits while a writer recovers the file.
      url: a PostgreSQL ledger instead of the file in `output_dir` (`tracker_eval.config.ledger`).

    Returns:
      The status, or None when there is no ledger (or no such run in it) yet.

    Raises:
      LedgerError: the file cannot be read, or has a schema this version cannot read.
    """
    def read(conn: sqlite3.Connection, run_stream: int) -> RunStatus:
        streams = conn.execute("SELECT stream_id, suite, config_hash FROM streams WHERE parent_id = ? "
                               "ORDER BY stream_id", (run_stream,)).fetchall()
        versions: dict[str, list[tuple[int, str]]] = {}
        for stream, suite, config_hash in streams:
            versions.setdefault(suite, []).append((stream, config_hash))
        chosen: dict[str, int] = {}
        earlier: dict[str, int] = {}
        for suite, found in versions.items():
            # A configured suite shows its current stream; a removed one its newest.
            current = [s for s, h in found if h == suites[suite]] if suite in suites else [found[-1][0]]
            for number, (stream, _) in enumerate(found, start=1):
                if current and stream == current[0]:
                    chosen[suite] = stream
                else:
                    earlier[f"{suite}-v{number}"] = stream
        order = [name for name in suites if name in chosen] + [n for n in chosen if n not in suites]
        streams_by_name = {**{name: chosen[name] for name in order}, **earlier}
        views = {name: LedgerView(conn, output_dir=Path(output_dir), stream=stream, run_stream=run_stream,
                                  suite=name) for name, stream in streams_by_name.items()}
        best_value = None
        if best is not None and best[0] in views:
            best_value = views[best[0]].best_by(best[1], best[2])
        heartbeat = LedgerView(conn, output_dir=Path(output_dir), stream=run_stream).last_heartbeat()
        return RunStatus(suites={name: view.rows() for name, view in views.items()}, best=best_value,
                         heartbeat=heartbeat)

    return read_stream(output_dir, checkpoint_dir=checkpoint_dir, config_hash=run_hash, read=read,
                        busy_timeout_s=busy_timeout_s, url=url)


def read_suite_versions(
    output_dir: str | os.PathLike[str], *, checkpoint_dir: str | os.PathLike[str], run_hash: str,
    suites: dict[str, tuple[str, ...]], busy_timeout_s: float = 30.0, url: str | None = None,
) -> dict[str, int]:
    """Which version each suite is (`tracker_eval.ledger.db.LedgerStore.suite_version`), without writing.

    Args:
      suites: suite name -> its stream hash, then hashes an earlier release gave it.

    Returns:
      name -> version: a stream's rank among the run's streams of that name; for a suite the
      ledger has no stream of yet, the version its stream will get (1 without a ledger).
    """
    def read(conn: sqlite3.Connection, run_stream: int) -> dict[str, int]:
        found: dict[str, list[str]] = {}
        for suite, config_hash in conn.execute("SELECT suite, config_hash FROM streams WHERE parent_id = ? "
                                               "ORDER BY stream_id", (run_stream,)):
            found.setdefault(suite, []).append(config_hash)
        versions = {}
        for name, hashes in suites.items():
            held = found.get(name, [])
            known = [held.index(h) + 1 for h in hashes if h in held]
            versions[name] = known[0] if known else len(held) + 1
        return versions

    versions = read_stream(output_dir, checkpoint_dir=checkpoint_dir, config_hash=run_hash, read=read,
                            busy_timeout_s=busy_timeout_s, url=url)
    return versions if versions is not None else dict.fromkeys(suites, 1)


def read_results(
    output_dir: str | os.PathLike[str],
    *,
    checkpoint_dir: str | os.PathLike[str],
    stream_hash: str,
    steps: Sequence[int],
    suite: tuple[str, str] | None = None,
    busy_timeout_s: float = 30.0,
    url: str | None = None,
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
      url: a PostgreSQL ledger instead of the file in `output_dir` (`tracker_eval.config.ledger`).

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

    return read_stream(output_dir, checkpoint_dir=checkpoint_dir, config_hash=stream_hash, read=read,
                        busy_timeout_s=busy_timeout_s, url=url)
