"""Where the ledger lives: the SQLite file in ``output_dir`` (the default), or a PostgreSQL database.

    ledger:
      url: postgresql://evals@db.internal:5432/evals?sslmode=require

Several watchers on several machines, and a training process elsewhere, share one PostgreSQL
ledger; one SQLite file serves only processes that share its disk. The URL may also come from the
environment (`ENV_VAR`), which a config's ``ledger.url`` overrides, so a Kubernetes Secret can
carry it without being written into the YAML. libpq's own settings apply (``PGPASSWORD``, a
passfile, ``sslmode=`` in the URL); a password written into the URL is accepted and masked
wherever tracker-eval prints, logs or stores text (`tracker_eval.redact`).

    url = resolve_ledger_url(config.ledger)   # None: the SQLite file in output_dir
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from typing import Any

from tracker_eval.errors import ConfigError
from tracker_eval.redact import redact_text, remember_secrets

ENV_VAR = "TRACKER_EVAL_LEDGER_URL"
"""The ledger URL when the config has no ``ledger.url``."""
SCHEMES = ("postgresql", "postgres")
"""URL schemes libpq accepts; both name a PostgreSQL ledger."""
_FORM = "postgresql://USER@HOST:PORT/DATABASE"


@dataclasses.dataclass(frozen=True)
class LedgerConfig:
    """Where the record of every step (states, claims, results, deliveries) is kept."""

    url: str | None = None
    """postgresql://USER@HOST:PORT/DATABASE (libpq URL; query options such as sslmode= pass through);
    null = the TRACKER_EVAL_LEDGER_URL environment variable, else the SQLite file <output_dir>/ledger.sqlite."""


def check_ledger_url(url: str, *, where: str = "ledger.url") -> None:
    """Checks the form of a ledger URL without connecting (the server is asked when the ledger opens).

    Args:
      url: the URL.
      where: the config key or environment variable it came from, for the message.

    Raises:
      ConfigError: not a postgresql:// URL, or a port that is not a number; the message shows the
        URL with its password masked and says how to write it.
    """
    shown = redact_text(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ConfigError(f"{where}={shown!r} is not a valid URL ({error}); write {_FORM}") from None
    if parts.scheme not in SCHEMES:
        raise ConfigError(
            f"{where}={shown!r} is not a PostgreSQL URL; write {_FORM}, or leave {where} unset to keep the "
            "ledger in the SQLite file <output_dir>/ledger.sqlite"
        )
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{where}={shown!r} has port {port}, outside 1..65535; write {_FORM}")
    if parts.path in ("", "/"):
        raise ConfigError(f"{where}={shown!r} names no database; write {_FORM}")


def resolve_ledger_url(config: LedgerConfig) -> str | None:
    """The ledger URL in effect: ``ledger.url``, else `ENV_VAR`; None for the SQLite file.

    A URL from the environment is checked here (one from the config was checked when it loaded),
    and its password is remembered so that it is masked wherever an error text quotes it.

    Raises:
      ConfigError: the environment's URL is malformed.
    """
    if config.url is not None:
        return config.url
    found = os.environ.get(ENV_VAR, "").strip()
    if not found:
        return None
    check_ledger_url(found, where=ENV_VAR)
    remember_secrets({"url": found})
    return found


def ledger_error(config: Any, error: Exception) -> str:
    """The one line a reader of the ledger says when it cannot read it: the SQLite file's message
    names `output_dir`, a PostgreSQL ledger's message names its database (password masked) already.

    Args:
      config: the `tracker_eval.config.EvalConfig` in use.
      error: the `tracker_eval.ledger.db.LedgerError` raised.
    """
    if resolve_ledger_url(config.ledger) is not None:
        return str(error)
    return f"output_dir={config.output_dir!r}: {error}"
