"""The record and the trackers of one evaluation stream, as process 0 holds them.

A stream is one checkpoint directory evaluated under one eval config. The watcher and
`InTrainingEvaluation` both open it the same way, so they share the ledger, the tracker runs and
the outbox rules. A config with several suites has one ledger stream per suite (`ledgers`, in
config order) and one set of tracker runs for all of them:

    stream = PrimaryStream.open(config)
    stream.ledger.claim(step, owner=stream.owner)
    ...
    stream.record(result)   # ledger, best checkpoint, wake delivery
    stream.close(drain_s=60, close_timeout_s=30)
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
from typing import Any

from tracker_eval.config import EvalConfig
from tracker_eval.config.ledger import resolve_ledger_url
from tracker_eval.errors import ConfigError, one_line
from tracker_eval.locations import join_path

LOG = logging.getLogger("tracker_eval")
BEST_FILENAME = "best.json"
_UNDRAINED_CLOSE_S = 5.0


def open_ledger(config: EvalConfig, *, loggers: list[str], suite: str | None = None) -> Any:
    """The ledger of one suite's stream (by default the config's first suite; the only one of a
    config without suites): in `output_dir`, or in the PostgreSQL database of ``ledger.url``.

    Raises:
      ConfigError: `output_dir` cannot hold it (not writable, not a local file system), or the
        PostgreSQL ledger cannot be reached or used; one line naming the fix (exit code 2).
    """
    from tracker_eval.identity import earlier_suite_hashes, run_hash, suite_hash  # noqa: PLC0415
    from tracker_eval.ledger.steps import Ledger, LedgerError  # noqa: PLC0415

    name = config.suite_list()[0].name if suite is None else suite
    best = config.watch.best if config.best_suite() == name else None
    url = resolve_ledger_url(config.ledger)
    try:
        return Ledger(
            config.output_dir,
            checkpoint_dir=config.checkpoint_dir,
            config_hash=suite_hash(config, name),
            earlier_hashes=earlier_suite_hashes(config, name),
            loggers=loggers,
            best_metric=best.metric if best else None,
            best_mode=best.mode if best else "min",
            max_attempts=config.watch.max_attempts,
            max_delivery_attempts=config.watch.max_delivery_attempts,
            run_hash=run_hash(config) if config.has_suites else None,
            suite=name,
            url=url,
        )
    except LedgerError as error:
        if url is not None:
            raise ConfigError(str(error)) from None
        raise ConfigError(f"output_dir={config.output_dir!r} cannot hold the ledger: {error}") from None


def suite_versions(config: EvalConfig) -> dict[str, int]:
    """Each suite's version as the ledger counts it, read without writing (`tracker-eval eval`, which
    delivers without a ledger, keys its results as the watcher does); all 1 without suites, and
    with a warning when the ledger cannot be read (e.g. an older schema that `watch` upgrades)."""
    from tracker_eval.identity import earlier_suite_hashes, run_hash, suite_hash  # noqa: PLC0415
    from tracker_eval.ledger.db import LedgerError  # noqa: PLC0415
    from tracker_eval.ledger.view import read_suite_versions  # noqa: PLC0415

    if not config.has_suites:
        return {"": 1}
    hashes = {s.name: (suite_hash(config, s.name), *earlier_suite_hashes(config, s.name)) for s in config.suites}
    try:
        return read_suite_versions(config.output_dir, checkpoint_dir=config.checkpoint_dir,
                                   url=resolve_ledger_url(config.ledger),
                                   run_hash=run_hash(config), suites=hashes)
    except LedgerError as error:
        LOG.warning("tracker-eval: warning: suite versions unknown, delivering as version 1: %s", error)
        return dict.fromkeys(hashes, 1)


def open_ledgers(config: EvalConfig, *, loggers: list[str]) -> dict[str, Any]:
    """Every suite's ledger, by suite name in config order ({"": ledger} without suites)."""
    return {suite.name: open_ledger(config, loggers=loggers, suite=suite.name) for suite in config.suite_list()}


def logger_names(config: EvalConfig) -> list[str]:
    """Instance names of the configured loggers (validates the specs)."""
    from tracker_eval.loggers.registry import parse_logger_specs  # noqa: PLC0415

    return [spec.name for spec in parse_logger_specs(config.loggers)]


@dataclasses.dataclass
class PrimaryStream:
    """Ledger, loggers (attached to the runs the ledger remembers) and outbox delivery threads."""

    config: EvalConfig
    ledgers: dict[str, Any]
    session: Any
    delivery: Any
    owner: str
    published_best: Any = None  # (best (step, value), runner-up) as last written to best.json

    def _step_folder(self, step: int) -> str:
        """The folder of `step` under checkpoint_dir (`checkpoint_<N>` for xlstm-jax's trainer)."""
        from tracker_eval.checkpoints.listing import read_step_names  # noqa: PLC0415
        from tracker_eval.checkpoints.roots import configured_names  # noqa: PLC0415
        from tracker_eval.checkpoints.tree import StorageUnavailableError  # noqa: PLC0415

        try:  # one listing, only when the best step changes
            return read_step_names(self.config.checkpoint_dir,
                                   step_names=configured_names(self.config.checkpoint)).folder(step)
        except StorageUnavailableError:
            return str(step)

    @classmethod
    def open(cls, config: EvalConfig) -> PrimaryStream:
        """Opens the ledger, the loggers and starts delivery.

        Tracker runs are persisted in the ledger at once, so a process started later (a watcher
        beside training, a restart) attaches to the same runs instead of creating its own.
        """
        from tracker_eval.ledger.lease import make_owner_id  # noqa: PLC0415
        from tracker_eval.loggers.session import LoggerSession  # noqa: PLC0415
        from tracker_eval.runners.delivery import Delivery  # noqa: PLC0415

        names = logger_names(config)
        ledgers = open_ledgers(config, loggers=names)
        ledger = next(iter(ledgers.values()))  # run state is the run's: any suite's ledger has it
        owner = make_owner_id()
        session = LoggerSession.open(config, run_state={name: ledger.get_run_state(name) for name in names})
        session.persist_run_states(ledger)
        # A logger's delivery lease must outlive one delivery (its deadline, plus up to 20 s of
        # yielding to a running evaluation), or a second process could take the logger over and
        # send the same step again while the first send is still in flight. A dead holder on this
        # host is taken over at once whatever the lease says.
        lease_s = max(config.watch.lease_ttl_s, config.watch.delivery_deadline_s + 30.0)
        best = config.watch.best
        delivery = Delivery(ledgers, session, owner=owner, lease_ttl_s=lease_s,
                            best_metric=best.metric if best else None, best_suite=config.best_suite())
        delivery.start()
        stream = cls(config=config, ledgers=ledgers, session=session, delivery=delivery, owner=owner)
        # Again at every start: a crash between the ledger's commit and best.json, or a tracker
        # that was down when the best changed, is repaired here.
        stream.publish_best()
        return stream

    @property
    def ledger(self) -> Any:
        """The first suite's ledger (the only one without suites); run-level state is shared."""
        return next(iter(self.ledgers.values()))

    def record(self, result: Any) -> bool:
        """Stores an evaluated result in its suite's ledger (under this process's claim), publishes
        a new best checkpoint and wakes delivery; False when the claim was lost and the result was
        not stored."""
        ledger = self.ledgers[result.suite]
        if self.config.watch.alerts:
            from tracker_eval.runners.alerts import raise_alerts  # noqa: PLC0415

            # Stored with the result in one transaction: raised once per (step, rule), delivered with it.
            alerts = raise_alerts(self.config, ledger, result)
            if alerts:
                result = dataclasses.replace(result, alerts=alerts)
        recorded = ledger.record_metrics(result, owner=self.owner)
        if recorded and result.suite:
            self._discard_answers(result.suite, result.step)
        self.publish_best()
        self.delivery.notify()
        return recorded

    def _discard_answers(self, suite: str, step: int) -> None:
        """Deletes the answers a suite kept for the step (`tracker_eval.ledger.answers`): its result is
        stored now. A failure only leaves rows that no later attempt of this step will need."""
        from tracker_eval.identity import answer_stream  # noqa: PLC0415
        from tracker_eval.ledger.answers import discard_answers  # noqa: PLC0415

        try:
            discard_answers(self.config.output_dir, stream=answer_stream(self.config, suite), step=step)
        except (OSError, sqlite3.Error) as error:
            LOG.warning("tracker-eval: kept answers of step %d suite %r not deleted: %s", step, suite,
                        one_line(error, limit=200))

    def publish_best(self) -> None:
        """Writes ``best.json`` when the ledger's best changed, and wakes delivery for the trackers.

        The ledger is the truth; the file lock orders processes of one stream (a watcher beside
        in-training evaluation), so an older best never overwrites a newer one. The trackers'
        best-step summary is sent by each logger's delivery lease holder, which reads the best from
        the ledger when it sends: an older best cannot arrive after a newer one either.
        """
        best_config = self.config.watch.best
        if best_config is None:
            return
        path = os.path.join(self.config.output_dir, BEST_FILENAME)
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            suite = self.config.best_suite()
            ledger = self.ledgers[suite]
            best = ledger.best()
            if best is None:
                return
            verdict = self._best_verdict(ledger, suite, best)
            published = (best, verdict.get("runner_up"))
            if published == self.published_best:
                return
            step, value = best
            payload = {"step": step, "metric": best_config.metric, "mode": best_config.mode, "value": value,
                       "checkpoint": join_path(self.config.checkpoint_dir, self._step_folder(step))}
            if suite:
                payload["suite"] = suite
            payload.update(verdict)
            with open(f"{path}.tmp", "w") as f:
                json.dump(payload, f, indent=2)
            os.replace(f"{path}.tmp", path)
        self.published_best = published
        self.delivery.notify()
        LOG.info("tracker-eval: best checkpoint so far: step %d (%s=%.4g)", step, best_config.metric, value)

    def _best_verdict(self, ledger: Any, suite: str, best: tuple[int, float]) -> dict[str, Any]:
        """The best against the runner-up (`tracker_eval.runners.best`), as ``best.json`` adds it.

        A new runner-up changes the verdict as surely as a new best, so both decide a rewrite.
        """
        from tracker_eval.runners.best import best_verdict  # noqa: PLC0415

        best_config = self.config.watch.best
        stored = [(row["step"], row["metrics"]) for row in ledger.rows() if row["state"] in ("evaluated", "delivered")]
        try:
            verdict = best_verdict(stored, ledger.result, best=best, metric=best_config.metric,
                                   mode=best_config.mode, suite=suite)
        except (OSError, ValueError) as error:  # an unreadable stored file: the best itself still counts
            LOG.warning("tracker-eval: best step %d not tested against the runner-up: %s", best[0], error)
            return {}
        return {**verdict.to_json(), "summary": verdict.line()}

    def close(self, *, drain_s: float, close_timeout_s: float) -> bool:
        """Waits up to `drain_s` for deliveries, closes the loggers; True when everything was delivered.

        Whatever is not delivered stays in the outbox for the next process to send. A tracker that
        did not take its backlog is probably down, so closing it is given at most 5 s. The order
        keeps delivery exactly once: the delivery threads stop, the loggers' own calls end (close
        waits for them), their run state is stored, and only then are the delivery leases given
        up, except those of loggers still busy, so no other process sends while a write may land.
        """
        drained = self.delivery.drain(drain_s)
        timeout = close_timeout_s if drained else min(close_timeout_s, _UNDRAINED_CLOSE_S)
        # A delivery thread still waiting on its logger is harmless: its acknowledgement either
        # lands before the release or fails, and the next holder checks that step (in flight).
        self.delivery.stop(timeout=min(timeout, 2.0))
        busy = self.session.close(timeout=timeout)
        self.session.persist_run_states(self.ledger)
        self.delivery.release(keep=busy)
        return drained

    def close_ledgers(self) -> None:
        """Closes every suite's ledger connections."""
        for ledger in self.ledgers.values():
            ledger.close()
