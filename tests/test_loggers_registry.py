"""Registry: entry-point resolution, config errors, and the light-import guarantee."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tracker_eval.errors import ConfigError
from tracker_eval.loggers.base import Logger, LoggerContext
from tracker_eval.loggers.console import ConsoleLogger
from tracker_eval.loggers.jsonl import JsonlLogger
from tracker_eval.loggers.registry import available_logger_types, build_loggers, load_logger_class, parse_logger_specs


def test_entry_points_resolve_all_four_types():
    assert {"console", "jsonl", "wandb", "mlflow"} <= set(available_logger_types())
    classes = {name: load_logger_class(name) for name in ("console", "jsonl", "wandb", "mlflow")}
    assert classes["console"] is ConsoleLogger
    assert classes["jsonl"] is JsonlLogger
    assert classes["wandb"].__name__ == "WandbLogger"
    assert classes["mlflow"].__name__ == "MlflowLogger"


def test_unknown_type_lists_installed_types():
    with pytest.raises(ConfigError) as info:
        parse_logger_specs([{"type": "wandbb"}])
    message = str(info.value)
    assert "'wandbb'" in message
    for name in ("console", "jsonl", "mlflow", "wandb"):
        assert name in message


def test_unknown_option_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as info:
        parse_logger_specs([{"type": "jsonl", "pth": "x.jsonl"}])
    message = str(info.value)
    assert "'pth'" in message and "path" in message and "per_example" in message


def test_plugin_options_checked_without_importing_tracker():
    with pytest.raises(ConfigError, match="'projet'.*project"):
        parse_logger_specs([{"type": "wandb", "projet": "x"}])
    with pytest.raises(ConfigError, match="timeout_s"):
        parse_logger_specs([{"type": "mlflow", "timeout_s": "ten"}])


def test_names_default_to_type_and_must_be_unique(tmp_path):
    context = LoggerContext(output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="'jsonl' is already used"):
        build_loggers([{"type": "jsonl"}, {"type": "jsonl", "path": "b.jsonl"}], context)
    loggers = build_loggers(
        [{"type": "console", "precision": 3}, {"type": "jsonl"}, {"type": "jsonl", "id": "b", "path": "b.jsonl"}],
        context,
    )
    try:
        assert [lg.name for lg in loggers] == ["console", "jsonl", "b"]
        assert all(isinstance(lg, Logger) for lg in loggers)
        assert loggers[0].config.precision == 3
        assert loggers[2].path == tmp_path / "b.jsonl"
    finally:
        for lg in loggers:
            lg.close()


def test_missing_type_is_an_error():
    with pytest.raises(ConfigError, match=r"loggers\[0\] needs a 'type'"):
        parse_logger_specs([{"path": "x"}])


def test_core_import_stays_light():
    code = (
        "import sys, tracker_eval, tracker_eval.errors, tracker_eval.evaluation.result, tracker_eval.loggers.base, "
        "tracker_eval.loggers.registry, tracker_eval.loggers.fanout, tracker_eval.loggers.console, "
        "tracker_eval.loggers.jsonl\n"
        "from tracker_eval.loggers.registry import parse_logger_specs\n"
        "parse_logger_specs([{'type': 'wandb', 'project': 'p'}, {'type': 'mlflow'}])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
