"""The run configuration: typed, frozen dataclasses (`schema`), named evaluation suites (`suites`),
their strict YAML loader (`load`), the valid range of every numeric setting (`ranges`) and where the
ledger lives (`ledger`: the SQLite file, or a PostgreSQL URL).

Shared by every stage.

May import: the shared top level only (errors, redact).

    from tracker_eval.config import load_config
    config = load_config("configs/watch.yaml", overrides=["mesh.data=4"])

Public names: EvalConfig, SuiteConfig, CheckpointConfig, MeshConfig, BestConfig, WatchConfig, DistributedConfig,
LedgerConfig, load_config, validate, policy_name, policy_text, off_cadence, resolve_ledger_url.
"""

from tracker_eval.config.ledger import LedgerConfig, resolve_ledger_url
from tracker_eval.config.load import load_config, validate
from tracker_eval.config.policy import off_cadence, policy_name, policy_text
from tracker_eval.config.schema import (
    BestConfig,
    CheckpointConfig,
    DistributedConfig,
    EvalConfig,
    MeshConfig,
    WatchConfig,
)
from tracker_eval.config.suites import SuiteConfig

__all__ = [
    "BestConfig",
    "CheckpointConfig",
    "DistributedConfig",
    "EvalConfig",
    "LedgerConfig",
    "MeshConfig",
    "SuiteConfig",
    "WatchConfig",
    "load_config",
    "off_cadence",
    "policy_name",
    "policy_text",
    "resolve_ledger_url",
    "validate",
]
