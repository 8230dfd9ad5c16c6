"""The valid range of every numeric setting, checked when a config loads.

    check_ranges(config)   # ConfigError: "watch.lease_ttl_s must be in [1, 86400], got 0.5"

One table, so README's configuration reference and the loader say the same thing; a new numeric
setting adds one row. NaN and infinity are outside every range.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tracker_eval.errors import ConfigError

_DAY_S = 86_400.0
_MAX_STEP = 2**63 - 1  # the ledger keeps steps as SQLite 64-bit integers


@dataclasses.dataclass(frozen=True)
class Range:
    """A closed interval, or half-open at the bottom.

    Attributes:
      low: the smallest valid value (excluded when `low_open`).
      high: the largest valid value.
      low_open: whether `low` itself is invalid (durations that must be positive).
      nullable: whether null (the documented "off") is valid too.
    """

    low: float
    high: float
    low_open: bool = False
    nullable: bool = False

    def contains(self, value: float) -> bool:
        # Written so that NaN fails every comparison and therefore the check.
        above = value > self.low if self.low_open else value >= self.low
        return bool(above and value <= self.high)

    def text(self) -> str:
        interval = f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"
        return interval + (" or null" if self.nullable else "")


RANGES: dict[str, Range] = {
    "batch_size": Range(1, 2**31 - 1),
    # To turn the cache off, cache: none; a limit of 0 would mean the same thing less clearly.
    "cache_max_mb": Range(0, 16 * 1024 * 1024, low_open=True),
    "watch.poll_interval_s": Range(0, 3_600.0, low_open=True),
    "watch.until_step": Range(0, _MAX_STEP, nullable=True),
    "watch.idle_timeout_s": Range(0, 30 * _DAY_S, low_open=True, nullable=True),
    "watch.max_attempts": Range(1, 1_000),
    "watch.max_delivery_attempts": Range(1, 1_000),
    # Renewed every third of it: below a second, one slow disk write would lose a living claim.
    "watch.lease_ttl_s": Range(1, _DAY_S),
    "watch.delivery_deadline_s": Range(0, _DAY_S, low_open=True),
    "watch.outbox_wait_s": Range(0, _DAY_S),
    "watch.health_stale_s": Range(0, _DAY_S, low_open=True, nullable=True),
    # JAX takes whole seconds: at least 1, so no value rounds down to "no timeout".
    "distributed.heartbeat_timeout_s": Range(1, _DAY_S),
    "distributed.initialization_timeout_s": Range(1, _DAY_S),
    "distributed.num_processes": Range(1, 1_000_000, nullable=True),
    "distributed.process_id": Range(0, 1_000_000, nullable=True),
}


def check_ranges(config: Any, *, skip: tuple[str, ...] = ()) -> None:
    """Checks every setting of `RANGES` that the config has (a null `distributed` block has none),
    except those in `skip` (a config with suites has no top-level batch_size: each suite has one).

    Raises:
      ConfigError: one line naming the key, its valid range and the bad value.
    """
    for key, valid in RANGES.items():
        if key in skip:
            continue
        found, value = _lookup(config, key)
        if not found or (value is None and valid.nullable):
            continue
        if value is None or not valid.contains(value):
            raise ConfigError(f"{key} must be in {valid.text()}, got {value!r}; set it within that range")


def _lookup(config: Any, key: str) -> tuple[bool, Any]:
    node = config
    for part in key.split("."):
        if node is None or not hasattr(node, part):
            return False, None
        node = getattr(node, part)
    return True, node


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
