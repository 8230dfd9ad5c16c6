"""Cadence policies: which checkpoints a watcher, or one suite, evaluates.

    policy_name({"every_n_steps": 1000}, key="suites.harness.policy")   # ("every_n_steps", 1000)
    policy_text("every_n_steps", 1000)                                  # "every 1000 steps"
    off_cadence("every_n_steps", 1000, 1500)   # "policy every_n_steps=1000: not a multiple of 1000"

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


def off_cadence(policy: str, every_n: int, step: int) -> str | None:
    """Why `step` is not due under a normalized policy, as `status` says it; None when it is due.

    Only `every_n_steps` judges a step by itself; `latest` skips a step only once a newer one is
    known, which the watcher decides over its backlog (a step handed over as it is saved is the newest).
    """
    if policy == "every_n_steps" and step % every_n:
        return f"policy every_n_steps={every_n}: not a multiple of {every_n}"
    return None
