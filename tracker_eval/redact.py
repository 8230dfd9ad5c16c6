"""Secrets out of everything tracker-eval records about a config.

Credentials belong in the environment (WANDB_API_KEY, MLFLOW_TRACKING_USERNAME/PASSWORD), but a
tracking URI such as ``https://alice:token@mlflow.example.com`` or a plug-in option named
``api_key`` can still carry one into the config. Before a config goes to a tracker (run params,
run config), user info in URLs and the values of secret-looking keys become ``***``:

    redact({"tracking_uri": "https://alice:tok@host", "api_key": "abc"})
    # {"tracking_uri": "https://***@host", "api_key": "***"}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_WORDS = {"password", "passwd", "secret", "token", "apikey", "credential", "credentials"}


def redact(value: Any, *, key: str = "") -> Any:
    """A copy of `value` (mappings, lists and strings, nested) with secrets masked."""
    if isinstance(value, Mapping):
        return {k: redact(v, key=str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key=key) for v in value]
    if isinstance(value, str):
        if value and _is_secret_key(key):
            return MASK
        return _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", value)
    return value


def _is_secret_key(key: str) -> bool:
    # Whole words of the key: "access_token", "api_key", "password" are secrets, "tokenizer" is not.
    words = re.split(r"[_\-.\s]+", key.lower())
    joined = {a + b for a, b in zip(words, words[1:], strict=False)}  # "api_key" -> "apikey"
    return bool(_SECRET_WORDS & (set(words) | joined))
