"""Test set-up: 8 fake CPU devices before JAX picks its backend, shared fixtures."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402 - after the environment above, which must precede any JAX import

# Helpers shared by several test files; their asserts get pytest's rewriting like the tests'.
pytest.register_assert_rewrite("watcher_harness", "browser", "fixtures_gcs", "fixtures_postgres")
