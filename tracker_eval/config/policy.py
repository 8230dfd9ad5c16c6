"""Cadence policies: which checkpoints a watcher, or one suite, evaluates.

    policy_name({"every_n_steps": 1000}, key="suites.harness.policy")   # ("every_n_steps", 1000)
    policy_text("every_n_steps", 1000)                                  # "every 1000 steps"

``watch.policy`` applies to every suite that sets no ``policy`` of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracker_eval.errors import ConfigError


def policy_name(policy: Any, *, key: str = "watch.policy") -> tuple[str, int]:
    """Normalizes a policy (`watch.policy`, or a suite's `policy` named by `key`) to (name, every_n).

    Raises:
      ConfigError: for anything but all, latest or {every_n_steps: N} with N >= 1.
    """
    if policy in ("all", "latest"):
        return policy, 1
    if isinstance(policy, Mapping) and set(policy) == {"every_n_steps"}:
        n = policy["every_n_steps"]
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
            return "every_n_steps", n
    raise ConfigError(
        f"{key} {policy!r} is not valid; use all, latest or {{every_n_steps: N}} with N >= 1"
    )


def policy_text(policy: str, every_n: int) -> str:
    """A normalized policy (`policy_name`'s result) as the log and `status` say it."""
    return policy if policy != "every_n_steps" else f"every {every_n} steps"
