"""Third-party-style loggers that fail (always, or at start-up): for failure-isolation tests only."""

from __future__ import annotations

import dataclasses
import json
import pathlib


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


class FlakyStartLogger:
    """Fails in its constructor the first `fail_starts` times in an output directory (as a tracker
    library whose start-up hits a transient error would), then records each result in
    ``<output_dir>/flaky-start.jsonl``."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        fail_starts: int = 1

    def __init__(self, config=None, *, context, name="flaky-start"):
        self.config = config or self.Config()
        self.name = name
        self.dir = pathlib.Path(context.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        attempts = self.dir / "flaky-start-attempts"
        count = int(attempts.read_text()) if attempts.exists() else 0
        attempts.write_text(str(count + 1))
        if count < self.config.fail_starts:
            raise ConnectionError(f"tracker unreachable at start-up (attempt {count + 1})")

    def log_config(self, config):
        pass

    def log_result(self, result):
        with open(self.dir / "flaky-start.jsonl", "a") as f:
            f.write(json.dumps({"step": int(result.step)}) + "\n")

    def flush(self):
        pass

    def close(self):
        pass
