"""The JAX distributed runtime's key-value store: the one place that touches JAX's private client.

    client = kvstore.client()                      # raises when the runtime is not initialized
    kvstore.try_get(client, "tracker_eval/alive/1")  # None when the key is not there

Processes of a multi-process job exchange small messages (decisions, heartbeats, per-example rows)
through the coordination service's key-value store, which JAX exposes only through a private module.
"""

from __future__ import annotations

from typing import Any


def client() -> Any:
    """The distributed runtime's client.

    Raises:
      RuntimeError: the JAX distributed runtime is not initialized.
    """
    from jax._src import distributed as jax_distributed  # noqa: PLC0415 - the runtime's key-value store

    runtime_client = jax_distributed.global_state.client
    if runtime_client is None:
        raise RuntimeError("the JAX distributed runtime is not initialized")
    return runtime_client


def try_get(runtime_client: Any, key: str) -> str | None:
    """The value of `key`, or None when it is not set."""
    try:
        return runtime_client.key_value_try_get(key)
    except Exception as error:  # noqa: BLE001
        if "NOT_FOUND" in str(error):
            return None
        raise
