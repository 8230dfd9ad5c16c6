"""Answers a suite computed for one (step, suite), kept durably so that a later attempt continues.

    scope = answer_scope(stream=config.suite_hash("harness"), step=1500,
                         identity={"model": ..., "tokenizer": ..., "max_length": 512, "tasks": {"cloze": 1.0}})
    with AnswerStore(output_dir, scope=scope) as store:
        keys = [request_key("loglikelihood", r.args) for r in requests]
        known = store.lookup(keys)              # {key: answer} from an earlier, killed attempt
        ...compute only the others...
        store.keep(key, answer)                 # buffered; written in batches by a writer thread
    discard_answers(output_dir, scope)          # once the (step, suite) result is stored

A suite that takes minutes to hours per checkpoint (the LM harness) should not start from nothing
after a preemption. Answers live in ``answers.sqlite`` beside the ledger, not in it: they are many,
short-lived rows written while an evaluation runs, and keeping them out of the ledger keeps its
schema and its write lock as they are. A scope hashes everything that determines an answer (the
suite's stream, the step, and what the suite names: model, tokenizer, max_length, task versions),
so an answer can never be served to another checkpoint or configuration. Writes are batched: one
transaction per `flush_s` or `max_batch` answers, so a process killed at any moment loses at most
the last `flush_s` seconds of answers, and the evaluation does not pay a transaction per request.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FILENAME = "answers.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
  scope TEXT NOT NULL,
  key TEXT NOT NULL,
  value TEXT NOT NULL,
  stream TEXT NOT NULL DEFAULT '',
  step INTEGER NOT NULL DEFAULT -1,
  PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS answers_by_step ON answers (stream, step)
"""
_LOOKUP_CHUNK = 500  # SQLite's default limit on host parameters is 999


def answer_scope(*, stream: str, step: int, identity: Mapping[str, Any]) -> str:
    """The scope of one (step, suite)'s answers: a hash of the stream, the step and `identity`.

    Args:
      stream: the suite's ledger stream identity (`EvalConfig.suite_hash`).
      step: the checkpoint step.
      identity: whatever else determines an answer (model, tokenizer, max_length, task versions).
    """
    blob = json.dumps({"stream": stream, "step": int(step), "identity": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def request_key(method: str, args: Any) -> str:
    """A request's key within a scope: its method and arguments (JSON, so tuples and lists match)."""
    return hashlib.sha256(json.dumps([method, args], sort_keys=True, default=str).encode()).hexdigest()


def _connect(output_dir: str | os.PathLike[str]) -> sqlite3.Connection:
    path = Path(output_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a committed batch survives a killed process
    conn.executescript(_SCHEMA)
    return conn


class AnswerStore:
    """The kept answers of one scope: `lookup` what an earlier attempt computed, `keep` new ones.

    Args:
      output_dir: the ledger's folder (``answers.sqlite`` is created there).
      scope: `answer_scope` of the (step, suite).
      flush_s: longest an answer waits in memory before its batch is written.
      max_batch: a batch this large is written at once.
      stream, step: the (stream, step) the scope belongs to, so that whoever stores the result can
        discard its answers without knowing the rest of the scope (`discard_answers`).
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, scope: str, flush_s: float = 2.0,
                 max_batch: int = 4096, stream: str = "", step: int = -1) -> None:
        if flush_s <= 0 or max_batch < 1:
            raise ValueError(f"need flush_s > 0 and max_batch >= 1, got flush_s={flush_s}, max_batch={max_batch}")
        self.scope = scope
        self._label = (stream, int(step))
        self.flush_s = flush_s
        self.max_batch = max_batch
        self.batches_written = 0
        self._conn = _connect(output_dir)
        self._pending: list[tuple[str, str, str, str, int]] = []
        self._cond = threading.Condition()  # guards _pending, _closed, _error
        self._db = threading.Lock()  # the connection; taken before _cond, never inside it
        self._closed = False
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="answer-store", daemon=True)
        self._writer.start()

    def __enter__(self) -> AnswerStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def lookup(self, keys: Iterable[str]) -> dict[str, Any]:
        """The kept answers among `keys` (written ones and those still waiting for their batch)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        # Under the connection lock no batch is between memory and the file: each answer is in one.
        with self._db:
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start:start + _LOOKUP_CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = self._conn.execute(f"SELECT key, value FROM answers WHERE scope = ? AND key IN ({marks})",
                                          (self.scope, *chunk)).fetchall()
                found.update((key, json.loads(value)) for key, value in rows)
            with self._cond:
                wanted_set = set(wanted)
                found.update((key, json.loads(value)) for _, key, value, _, _ in self._pending if key in wanted_set)
        return found

    def keep(self, key: str, answer: Any) -> None:
        """Queues one answer (JSON-able: a float, a (float, bool) pair, a string) for the next batch.

        Raises:
          RuntimeError: an earlier batch could not be written (the reason is chained).
        """
        value = json.dumps(answer)
        with self._cond:
            if self._error is not None:
                raise RuntimeError(f"answers could not be kept: {self._error}") from self._error
            self._pending.append((self.scope, key, value, *self._label))
            if len(self._pending) >= self.max_batch:
                self._cond.notify_all()

    def close(self) -> None:
        """Writes what is waiting and stops the writer thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        self._conn.close()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or len(self._pending) >= self.max_batch,
                                    timeout=self.flush_s)
            # keep() goes on while the batch is written; lookup() waits for the connection.
            with self._db:
                with self._cond:
                    batch, self._pending = self._pending, []
                    closed = self._closed
                if batch:
                    try:
                        with self._conn:
                            self._conn.execute("BEGIN IMMEDIATE")
                            self._conn.executemany("INSERT OR REPLACE INTO answers (scope, key, value, stream, "
                                                   "step) VALUES (?, ?, ?, ?, ?)", batch)
                        self.batches_written += 1
                    except sqlite3.Error as error:  # the next keep() reports it
                        with self._cond:
                            self._error = error
            if closed:
                return


def discard_answers(output_dir: str | os.PathLike[str], scope: str | None = None, *, stream: str | None = None,
                    step: int | None = None) -> int:
    """Deletes a scope's answers, or every scope's of one (stream, step) (its result is stored);
    returns how many there were."""
    if (scope is None) == (stream is None or step is None):
        raise ValueError("discard_answers needs either scope or both stream and step")
    if not (Path(output_dir) / FILENAME).exists():
        return 0
    conn = _connect(output_dir)
    try:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            if scope is not None:
                return conn.execute("DELETE FROM answers WHERE scope = ?", (scope,)).rowcount
            return conn.execute("DELETE FROM answers WHERE stream = ? AND step = ?", (stream, int(step))).rowcount
    finally:
        conn.close()
