"""Console logger: prints a readable table of each result's metrics.

    logger = ConsoleLogger(ConsoleLogger.Config(precision=4), context=context, name="console")
    logger.log_result(result)
    # eval step 300 (/ckpt/300)
    #   loss               1.2346
    #   per_example/loss   n=1000 mean=1.2346
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

from tracker_eval.errors import ConfigError
from tracker_eval.evaluation.result import EvalResult, metric_key
from tracker_eval.identity import tracker_suite
from tracker_eval.loggers.base import LoggerContext

_STREAMS = ("stdout", "stderr")


@dataclasses.dataclass(frozen=True)
class ConsoleConfig:
    """Options of ``type: console``."""

    precision: int = 4
    """Significant digits shown for each value."""
    stream: str = "stdout"
    """stdout or stderr."""


class ConsoleLogger:
    """Prints one table per result; per-example arrays are shown as count and mean."""

    Config = ConsoleConfig

    def __init__(self, config: ConsoleConfig | None = None, *, context: LoggerContext, name: str = "console") -> None:
        self.config = config or ConsoleConfig()
        if self.config.stream not in _STREAMS:
            raise ConfigError(f"console stream {self.config.stream!r} is not one of {', '.join(_STREAMS)}")
        if self.config.precision < 1:
            raise ConfigError(f"console precision must be >= 1, got {self.config.precision}")
        self.name = name
        self.prefix = context.prefix

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Prints nothing: the config is long and already on disk."""

    def log_result(self, result: EvalResult) -> None:
        """Prints the table for one result."""
        rows = [(name, self._number(value)) for name, value in sorted(result.metrics.items())]
        for name, values in sorted(result.per_example.items()):
            array = np.asarray(values, dtype=np.float64).reshape(-1)
            mean = float(np.nanmean(array)) if array.size and not np.isnan(array).all() else math.nan
            rows.append((f"per_example/{name}", f"n={array.size} mean={self._number(mean)}"))
        width = max((len(name) for name, _ in rows), default=0)
        lines = [f"{metric_key(self.prefix, tracker_suite(result), '')} step {result.step} ({result.checkpoint})"]
        lines += [f"  {name:<{width}}  {text}" for name, text in rows] or ["  (no metrics)"]
        lines += [f"WARNING: regression alert: {alert['message']}" for alert in result.alerts]
        # One write per table: print() writes text and newline separately, and a log line from
        # another thread could land between them.
        stream = self._stream()
        stream.write("\n".join(lines) + "\n")
        stream.flush()

    def flush(self) -> None:
        """Flushes the stream."""
        self._stream().flush()

    def close(self) -> None:
        """Flushes; the stream itself is not ours to close."""
        self.flush()

    def _stream(self) -> TextIO:
        # Looked up per call so redirection (pytest capture, contextlib.redirect_stdout) is honoured.
        return sys.stdout if self.config.stream == "stdout" else sys.stderr

    def _number(self, value: Any) -> str:
        return f"{float(value):.{self.config.precision}g}"
