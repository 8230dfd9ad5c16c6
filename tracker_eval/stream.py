"""The record and the trackers of one evaluation stream, as process 0 holds them.

A stream is one checkpoint directory evaluated under one eval config. The watcher and
`InTrainingEvaluation` both open it the same way, so they share the ledger, the tracker runs and
the outbox rules:

    stream = PrimaryStream.open(config)
    stream.ledger.claim(step, owner=stream.owner)
    ...
    stream.ledger.record_metrics(result, owner=stream.owner); stream.delivery.notify()
    stream.close(drain_s=60, close_timeout_s=30)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tracker_eval.config import EvalConfig
from tracker_eval.errors import ConfigError


def open_ledger(config: EvalConfig, *, loggers: list[str]) -> Any:
    """The ledger of the config's stream in `output_dir`.

    Raises:
      ConfigError: `output_dir` cannot hold it (not writable, not a local file system).
    """
    from tracker_eval.ledger import Ledger, LedgerError  # noqa: PLC0415

    best = config.watch.best
    try:
        return Ledger(
            config.output_dir,
            checkpoint_dir=config.checkpoint_dir,
            config_hash=config.config_hash(),
            loggers=loggers,
            best_metric=best.metric if best else None,
            best_mode=best.mode if best else "min",
            max_attempts=config.watch.max_attempts,
        )
    except LedgerError as error:
        raise ConfigError(f"output_dir={config.output_dir!r} cannot hold the ledger: {error}") from None


def logger_names(config: EvalConfig) -> list[str]:
    """Instance names of the configured loggers (validates the specs)."""
    from tracker_eval.loggers.registry import parse_logger_specs  # noqa: PLC0415

    return [spec.name for spec in parse_logger_specs(config.loggers)]


@dataclasses.dataclass
class PrimaryStream:
    """Ledger, loggers (attached to the runs the ledger remembers) and outbox delivery threads."""

    ledger: Any
    session: Any
    delivery: Any
    owner: str

    @classmethod
    def open(cls, config: EvalConfig) -> PrimaryStream:
        """Opens the ledger, the loggers and starts delivery.

        Tracker runs are persisted in the ledger at once, so a process started later (a watcher
        beside training, a restart) attaches to the same runs instead of creating its own.
        """
        from tracker_eval.delivery import Delivery  # noqa: PLC0415
        from tracker_eval.lease import make_owner_id  # noqa: PLC0415
        from tracker_eval.reporting import LoggerSession  # noqa: PLC0415

        names = logger_names(config)
        ledger = open_ledger(config, loggers=names)
        owner = make_owner_id()
        session = LoggerSession.open(config, run_state={name: ledger.get_run_state(name) for name in names})
        session.persist_run_states(ledger)
        delivery = Delivery(ledger, session, owner=owner, lease_ttl_s=config.watch.lease_ttl_s)
        delivery.start()
        return cls(ledger=ledger, session=session, delivery=delivery, owner=owner)

    def close(self, *, drain_s: float, close_timeout_s: float) -> bool:
        """Waits up to `drain_s` for deliveries, closes the loggers; True when everything was delivered.

        Whatever is not delivered stays in the outbox for the next process to send.
        """
        drained = self.delivery.drain(drain_s)
        self.delivery.stop(timeout=2.0)
        self.session.persist_run_states(self.ledger)
        self.session.close(timeout=close_timeout_s)
        return drained
