"""Exceptions shared across tracker-eval.

`ConfigError` marks a mistake in user input (YAML config, overrides, logger specs): its message names
the bad value, the valid choices and the fix, so a typo fails before any work starts.

    from tracker_eval.errors import ConfigError
    raise ConfigError("unknown logger type 'wandbb'; installed: console, jsonl, mlflow, wandb")
"""

from __future__ import annotations

from tracker_eval.redact import redact_text


class ConfigError(ValueError):
    """Invalid configuration: the message names the bad value, the valid choices and the fix."""


class UsageError(ConfigError):
    """A command-line mistake (exit code 2)."""


_JAX_TRACEBACK_NOTE = "\n--------------------\n"


def one_line(error: BaseException, *, limit: int | None = None) -> str:
    """The error's message on one line for a log or ledger entry, cut to `limit` characters if given.

    Credentials in it (a tracker's URL with user info, a token) are masked (`tracker_eval.redact`):
    every error text tracker-eval prints or stores goes through here. JAX appends a note about its
    filtered traceback frames to errors raised under tracing; that note says nothing about the
    error and is dropped.
    """
    text = str(error).split(_JAX_TRACEBACK_NOTE, 1)[0]
    return redact_text(" ".join(text.split()))[:limit] or type(error).__name__
