"""Config: every file in configs/ loads; mistakes are one-line errors naming key and choices."""

from __future__ import annotations

import pathlib

import pytest

from tracker_eval.config import EvalConfig, load_config
from tracker_eval.errors import ConfigError
from tracker_eval.identity import stream_hash
from tracker_eval.loggers.registry import parse_logger_specs
from tracker_eval.runners.pipeline import Components

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINIMAL = """
checkpoint_dir: /tmp/ckpts
model: tracker_eval.tasks.classification:make_model
eval_function: tracker_eval.tasks.classification:eval_function
data: tracker_eval.tasks.classification:make_eval_data
batch_size: 32
"""


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_resolves(path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(path)
    assert isinstance(config, EvalConfig)
    Components.resolve(config)  # every import path in it imports
    specs = parse_logger_specs(config.loggers)  # every logger type exists and its options are valid
    assert specs


def test_defaults_match_the_documented_contract(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.split == "validation"
    assert config.checkpoint.item is None and config.checkpoint.params == "params"
    assert config.checkpoint.mutable == ()
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (-1, 1, 1)
    assert config.output_dir == "runs/eval"
    assert [dict(s) for s in config.loggers] == [{"type": "console"}]
    assert config.cache == "host" and config.cache_max_mb == 1024


def test_overrides_with_nested_keys_and_yaml_values(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL),
                         overrides=["mesh.data=4", "checkpoint.mutable=[batch_stats]",
                                    "watch.policy={every_n_steps: 2}"])
    assert config.mesh.data == 4
    assert config.checkpoint.mutable == ("batch_stats",)
    assert config.watch.policy == {"every_n_steps": 2}


def test_environment_interpolation_for_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_SPLIT_FROM_ENV", "test")
    config = load_config(_write(tmp_path, MINIMAL + "split: ${oc.env:EVAL_SPLIT_FROM_ENV}\n"))
    assert config.split == "test"


@pytest.mark.parametrize(
    "extra, overrides, message",
    [
        ("batch_sise: 3\n", [], r"unknown config key batch_sise; valid keys: checkpoint_dir, model"),
        ("", ["mesh.dta=2"], r"unknown config key mesh.dta in 'mesh'; valid keys: data, fsdp, tensor"),
        ("", ["batch_size=abc"], r"'batch_size' must be an integer, got 'abc'"),
        ("", ["watch.policy=sometimes"], r"watch.policy 'sometimes' is not valid; use all, latest"),
        ("", ["mesh.data=-1", "mesh.fsdp=-1"], r"at most one mesh axis may be -1"),
        ("", ["params_sharding=diagonal"], r"params_sharding 'diagonal' is not one of auto, replicated, fsdp"),
        ("", ["nonsense"], r"override 'nonsense' is not key=value"),
        ("", ["cache=disk"], r"cache 'disk' is not one of host, device, none"),
        ("", ["cache_max_mb=0"], r"cache_max_mb must be in \(0, 16777216\], got 0.0; set it within that range"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_key_and_choices(tmp_path, extra, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_write(tmp_path, MINIMAL + extra), overrides=overrides)
    assert "\n" not in str(info.value)


def test_missing_required_key(tmp_path):
    text = "\n".join(line for line in MINIMAL.splitlines() if not line.startswith("data:"))
    with pytest.raises(ConfigError, match=r"missing required config key\(s\) \['data'\]"):
        load_config(_write(tmp_path, text))


def test_import_path_typo_fails_at_load_naming_the_path(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL),
                         overrides=["eval_function=tracker_eval.tasks.classification:eval_fucntion"])
    bad = r"eval_function='tracker_eval.tasks.classification:eval_fucntion'.*no attribute"
    with pytest.raises(ConfigError, match=bad):
        Components.resolve(config)


def test_config_hash_ignores_mesh_and_batch_but_not_the_model(tmp_path):
    path = _write(tmp_path, MINIMAL)
    base = stream_hash(load_config(path))
    assert stream_hash(load_config(path, overrides=["mesh.data=2", "batch_size=8"])) == base
    assert stream_hash(load_config(path, overrides=["split=test"])) != base


@pytest.mark.parametrize(
    "override, key, valid",
    [
        ("watch.lease_ttl_s=0.5", "watch.lease_ttl_s", "[1, 86400]"),
        ("watch.lease_ttl_s=.nan", "watch.lease_ttl_s", "[1, 86400]"),
        ("watch.delivery_deadline_s=0", "watch.delivery_deadline_s", "(0, 86400]"),
        ("watch.delivery_deadline_s=.inf", "watch.delivery_deadline_s", "(0, 86400]"),
        ("watch.outbox_wait_s=-1", "watch.outbox_wait_s", "[0, 86400]"),
        ("watch.health_stale_s=0", "watch.health_stale_s", "(0, 86400] or null"),
        ("watch.idle_timeout_s=0", "watch.idle_timeout_s", "(0, 2592000] or null"),
        ("watch.until_step=-5", "watch.until_step", f"[0, {2**63 - 1}] or null"),
        ("watch.max_attempts=0", "watch.max_attempts", "[1, 1000]"),
        ("watch.max_delivery_attempts=0", "watch.max_delivery_attempts", "[1, 1000]"),
        ("cache_max_mb=-1", "cache_max_mb", "(0, 16777216]"),
        ("watch.poll_interval_s=0", "watch.poll_interval_s", "(0, 3600]"),
        ("batch_size=0", "batch_size", "[1, 2147483647]"),
        ("distributed.heartbeat_timeout_s=0.5", "distributed.heartbeat_timeout_s", "[1, 86400]"),
        ("distributed.initialization_timeout_s=-3", "distributed.initialization_timeout_s", "[1, 86400]"),
        ("distributed.num_processes=0", "distributed.num_processes", "[1, 1000000] or null"),
    ],
)
def test_every_numeric_setting_is_range_checked(tmp_path, override, key, valid):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, MINIMAL), overrides=[override])
    message = str(info.value)
    assert message.startswith(f"{key} must be in {valid}, got "), message
    assert "\n" not in message


def test_range_edges_are_valid_and_floats_stay_floats(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL), overrides=[
        "watch.lease_ttl_s=1", "watch.outbox_wait_s=0", "watch.until_step=0", "watch.idle_timeout_s=null",
        "distributed.heartbeat_timeout_s=2.5", "distributed.initialization_timeout_s=30"])
    assert config.watch.lease_ttl_s == 1.0 and isinstance(config.watch.lease_ttl_s, float)
    assert config.watch.until_step == 0 and config.watch.idle_timeout_s is None
    assert config.distributed.heartbeat_timeout_s == 2.5  # not truncated to a whole second
    assert isinstance(config.distributed.initialization_timeout_s, float)


def test_out_of_range_setting_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    exe = str(pathlib.Path(sys.executable).with_name("tracker-eval"))
    proc = subprocess.run([exe, "status", "--config", str(_write(tmp_path, MINIMAL)), "watch.lease_ttl_s=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("tracker-eval: error: watch.lease_ttl_s must be in [1, 86400], got 0.0; "
                                   "set it within that range")
