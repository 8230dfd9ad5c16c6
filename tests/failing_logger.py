"""A third-party-style logger that always fails: for failure-isolation tests only."""

from __future__ import annotations

import dataclasses


class FailingLogger:
    """Raises on every result (as a tracker that rejects requests would)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        reason: str = "tracker rejected the request"

    def __init__(self, config=None, *, context, name="failing"):
        self.config = config or self.Config()
        self.name = name

    def log_config(self, config):
        pass

    def log_result(self, result):
        raise RuntimeError(self.config.reason)

    def flush(self):
        pass

    def close(self):
        pass
