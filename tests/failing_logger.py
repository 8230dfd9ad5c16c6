"""Third-party-style loggers that fail (always, at start-up, for some steps) or answer slowly: for
failure-isolation tests only."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

from tracker_eval.loggers.jsonl import JsonlConfig, JsonlLogger


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


class CredentialEchoLogger:
    """Fails the way tracker libraries do when they quote their request: its URL with user info, a
    header, a query parameter and the environment's keys in the clear."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        url: str = "https://api.example.com"

    def __init__(self, config=None, *, context, name="echo"):
        self.config = config or self.Config()
        self.name = name

    def log_config(self, config):
        pass

    def log_result(self, result):
        token, key = os.environ.get("MLFLOW_TRACKING_TOKEN", ""), os.environ.get("WANDB_API_KEY", "")
        raise RuntimeError(f"POST {self.config.url}/graphql?api_key={key} failed: 401 Unauthorized "
                           f"(Authorization: Bearer {token}); rejected key {key} and token {token}")

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


@dataclasses.dataclass(frozen=True)
class SlowJsonlConfig(JsonlConfig):
    delay_s: float = 0.0


class SlowJsonlLogger(JsonlLogger):
    """The JSONL logger whose every write starts `delay_s` late (a tracker answering slowly)."""

    Config = SlowJsonlConfig

    def log_result(self, result):
        time.sleep(self.config.delay_s)
        super().log_result(result)


class PickyLogger:
    """Records each result in memory, but refuses (permanently) steps in ``refuse``, fails steps in
    ``fail`` every time (a transient-looking error), and has no connection for steps in ``outage``
    the first ``outage_tries`` times."""

    def __init__(self, *, refuse=(), fail=(), outage=(), outage_tries=0, name="picky"):
        self.name = name
        self.refuse, self.fail, self.outage = set(refuse), set(fail), set(outage)
        self.outage_tries = outage_tries
        self.tries: dict[int, int] = {}
        self.received: list[int] = []

    def log_config(self, config):
        pass

    def log_result(self, result):
        from tracker_eval.loggers.failures import PermanentDeliveryError

        step = int(result.step)
        self.tries[step] = self.tries.get(step, 0) + 1
        if step in self.refuse:
            raise PermanentDeliveryError(f"HTTP 400: step {step} refused")
        if step in self.fail:
            raise RuntimeError(f"step {step} broke the tracker's parser")
        if step in self.outage and self.tries[step] <= self.outage_tries:
            raise ConnectionRefusedError(111, "Connection refused")
        self.received.append(step)

    def flush(self):
        pass

    def close(self):
        pass
