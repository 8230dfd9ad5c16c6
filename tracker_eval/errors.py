"""Exceptions shared across tracker-eval.

`ConfigError` marks a mistake in user input (YAML config, overrides, logger specs): its message names
the bad value, the valid choices and the fix, so a typo fails before any work starts.

    from tracker_eval.errors import ConfigError
    raise ConfigError("unknown logger type 'wandbb'; installed: console, jsonl, mlflow, wandb")
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid configuration: the message names the bad value, the valid choices and the fix."""
