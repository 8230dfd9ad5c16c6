"""The JAX distributed runtime's key-value store: the one place that touches JAX's private client.

    client = kvstore.client()                        # raises when the runtime is not initialized
    kvstore.try_get(client, "tracker_eval/alive/1")  # None when the key is not there
    kvstore.wait_get(client, key, timeout_s=0.5)     # None when it did not appear in time

Processes of a multi-process job exchange small messages (decisions, agreements, heartbeats,
per-example rows) through the coordination service's key-value store, which JAX exposes only
through a private module. `client()` checks once that the installed jaxlib still has every method
used here (`METHODS`) and fails with one line naming the installed version when it does not;
tests/test_multihost.py checks the same against a live runtime, so an API move fails loudly in CI
instead of hanging a job. A single-process run never gets here.
"""

from __future__ import annotations

import logging
from typing import Any

LOG = logging.getLogger(__name__)

# The client methods tracker-eval calls, with the parameters it passes (nanobind signatures).
METHODS = {
    "key_value_set": ("key", "value", "allow_overwrite"),
    "key_value_set_bytes": ("key", "value", "allow_overwrite"),
    "key_value_try_get": ("key",),
    "blocking_key_value_get": ("key", "timeout_in_ms"),
    "blocking_key_value_get_bytes": ("key", "timeout_in_ms"),
    "key_value_dir_get_bytes": ("key",),
    "key_value_delete": ("key",),
}
TESTED_JAXLIB = ((0, 10), (0, 11))  # [low, high): the releases these methods were verified with

_checked = False


def jaxlib_version() -> str:
    import jaxlib  # noqa: PLC0415

    return str(getattr(jaxlib, "__version__", "unknown"))


def check_client_api(client_type: type) -> None:
    """Raises when `client_type` lacks a method (or a parameter) tracker-eval calls.

    Raises:
      RuntimeError: names the installed jaxlib, what moved, and the tested range.
    """
    moved = [name for name in METHODS if not callable(getattr(client_type, name, None))]
    if moved:
        low, high = (".".join(map(str, v)) for v in TESTED_JAXLIB)
        raise RuntimeError(
            f"jaxlib {jaxlib_version()}'s distributed runtime client has no {', '.join(moved)}; "
            f"tracker-eval's multi-process coordination was tested with jaxlib >={low},<{high}: "
            "install a jax/jaxlib in that range (requirements.lock pins one)"
        )


def _check_version_once(runtime_client: Any) -> None:
    global _checked  # noqa: PLW0603 - one check per process
    if _checked:
        return
    check_client_api(type(runtime_client))
    version = jaxlib_version()
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        release = ()
    if not TESTED_JAXLIB[0] <= release < TESTED_JAXLIB[1]:
        LOG.warning("tracker-eval: jaxlib %s is outside the tested range %s..%s for multi-process "
                    "coordination; its client has every method used, so going on", version,
                    *TESTED_JAXLIB)
    _checked = True


def client() -> Any:
    """The distributed runtime's client, checked once against the methods used here.

    Raises:
      RuntimeError: the JAX distributed runtime is not initialized, or its client moved.
    """
    from jax._src import distributed as jax_distributed  # noqa: PLC0415 - the runtime's key-value store

    runtime_client = getattr(getattr(jax_distributed, "global_state", None), "client", None)
    if runtime_client is None:
        if not hasattr(jax_distributed, "global_state"):
            raise RuntimeError(f"jax._src.distributed.global_state moved in jaxlib {jaxlib_version()}; "
                               "install the jax/jaxlib that requirements.lock pins")
        raise RuntimeError("the JAX distributed runtime is not initialized")
    _check_version_once(runtime_client)
    return runtime_client


def _missing(error: Exception) -> bool:
    return "NOT_FOUND" in str(error)


def _timed_out(error: Exception) -> bool:
    text = str(error)
    return "DEADLINE_EXCEEDED" in text or "timed out" in text.lower()


def try_get(runtime_client: Any, key: str) -> str | None:
    """The value of `key`, or None when it is not set."""
    try:
        return runtime_client.key_value_try_get(key)
    except Exception as error:  # noqa: BLE001
        if _missing(error):
            return None
        raise


def wait_get(runtime_client: Any, key: str, *, timeout_s: float) -> str | None:
    """The value of `key` once it is set, or None when it is still unset after `timeout_s`."""
    try:
        return runtime_client.blocking_key_value_get(key, max(1, int(timeout_s * 1000)))
    except Exception as error:  # noqa: BLE001
        if _timed_out(error):
            return None
        raise


def wait_get_bytes(runtime_client: Any, key: str, *, timeout_s: float) -> bytes | None:
    """`wait_get` for a bytes value."""
    try:
        return runtime_client.blocking_key_value_get_bytes(key, max(1, int(timeout_s * 1000)))
    except Exception as error:  # noqa: BLE001
        if _timed_out(error):
            return None
        raise


def put(runtime_client: Any, key: str, value: str | bytes, *, overwrite: bool = False) -> None:
    """Sets `key` (a str or bytes value); without `overwrite`, a key already set is an error."""
    if isinstance(value, bytes):
        runtime_client.key_value_set_bytes(key, value, allow_overwrite=overwrite)
    else:
        runtime_client.key_value_set(key, value, allow_overwrite=overwrite)


def set_once(runtime_client: Any, key: str, value: str) -> bool:
    """Sets `key` unless it is already set; returns True when this call set it."""
    try:
        runtime_client.key_value_set(key, value)
    except Exception as error:  # noqa: BLE001
        if "ALREADY_EXISTS" in str(error):
            return False
        raise
    return True


def keys_under(runtime_client: Any, directory: str) -> dict[str, bytes]:
    """Every key below `directory` (`directory/...`) with its value as bytes."""
    return dict(runtime_client.key_value_dir_get_bytes(directory))


def delete(runtime_client: Any, key: str) -> None:
    """Deletes `key` and every key below it (`key/...`); a missing key is not an error."""
    runtime_client.key_value_delete(key)
