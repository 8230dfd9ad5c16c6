"""Secrets out of everything tracker-eval records, prints or logs: configs and error texts.

Credentials belong in the environment (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_USERNAME/PASSWORD), but a tracking URI such as ``https://alice:token@mlflow.example.com``
or a plug-in option named ``api_key`` can still carry one into the config. Before a config goes to
a tracker (run params, run config), user info in URLs and the values of secret-looking keys
become ``***``:

    redact({"tracking_uri": "https://alice:tok@host", "api_key": "abc"})
    # {"tracking_uri": "https://***@host", "api_key": "***"}

Tracker libraries quote their own URL, and sometimes a header or a key, in their error texts
(MLflow: ``API request to http://alice:tok@host/api/2.0/... failed``). Every error text that
tracker-eval prints, logs or stores goes through `redact_text` (`tracker_eval.errors.one_line`, the
log handler of `tracker_eval.logs`, the ledger's failure reasons):

    redact_text("API request to http://alice:tok@host/api failed")   # "API request to http://***@host/api failed"

It masks user info in URLs, ``Authorization``-style credentials (``Bearer ...``, ``Basic ...``),
secret query parameters (``?token=...``), and wherever they appear literally: the values of
environment variables with secret-looking names (``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``,
``*_PASSWORD``, ``PGPASSWORD``, ...) and the secrets a loaded config holds (`remember_secrets`).
"""

from __future__ import annotations

import os
import re
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "***"
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_WORDS = {"password", "passwd", "secret", "token", "apikey", "credential", "credentials"}
_AUTH_SCHEME = re.compile(r"(?i)(?P<scheme>\b(?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=-]{8,}")
_SECRET_PARAM = re.compile(
    r"(?i)(?P<name>\b(?:[a-z0-9]+[_-])*(?:token|api[_-]?key|(?:access|secret|private)[_-]?key|password|passwd|secret)=)[^&\s'\"]+")
# Shorter values are too likely to occur by chance ("1", "true") to be masked wherever they appear.
_MIN_LITERAL = 6
_DATABASE_SCHEMES = ("postgresql://", "postgres://")
# Secret variables whose names hide the word: libpq's password of a PostgreSQL ledger.
_SECRET_VARIABLES = {"PGPASSWORD"}
_remembered: set[str] = set()
_remembered_lock = threading.Lock()


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


def redact_text(text: str) -> str:
    """`text` (an error message, a log line) with every credential we know of masked as ``***``.

    Args:
      text: any text that may quote a URL, a header or a secret.

    Returns:
      The text with URL user info, ``Bearer``/``Basic``/``token`` credentials, secret query
      parameters, and the literal values of secret environment variables and remembered config
      secrets masked.
    """
    if not text:
        return text
    text = _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    text = _AUTH_SCHEME.sub(rf"\g<scheme>{MASK}", text)
    text = _SECRET_PARAM.sub(rf"\g<name>{MASK}", text)
    for secret in _literal_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def remember_secrets(value: Any, *, key: str = "") -> None:
    """Remembers, for `redact_text`, the secrets in a config: values of secret-looking keys and
    the user info of URLs (``alice:tok`` and ``tok`` of ``https://alice:tok@host``).

    Args:
      value: a config as plain mappings, lists and strings (nested).
      key: the key `value` sits under.
    """
    found: set[str] = set()
    _collect(value, key=key, into=found)
    with _remembered_lock:
        _remembered.update(s for s in found if len(s) >= _MIN_LITERAL)


def _collect(value: Any, *, key: str, into: set[str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _collect(v, key=str(k), into=into)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect(v, key=key, into=into)
    elif isinstance(value, str) and value:
        if _is_secret_key(key):
            into.add(value)
        for match in _URL_USERINFO.finditer(value):
            userinfo = value[match.end("scheme") : match.end() - 1]
            _, _, password = userinfo.partition(":")
            # A database URL's user is a role name (often a common word), not a secret: masking it
            # wherever it appears would garble unrelated text. Elsewhere a lone user info may be a token.
            if match.group("scheme").lower() in _DATABASE_SCHEMES and not password:
                continue
            into.add(userinfo)
            into.update(p for p in (password, urllib.parse.unquote(password)) if p)


def _literal_secrets() -> list[str]:
    """Secrets to mask wherever they appear, longest first (so that no part of one is left)."""
    with _remembered_lock:
        found = set(_remembered)
    found.update(v for k, v in os.environ.items()
                 if len(v) >= _MIN_LITERAL and (_is_secret_key(k) or k in _SECRET_VARIABLES))
    return sorted(found, key=len, reverse=True)
