"""`tracker-eval ledger copy`: a run's SQLite ledger moved into PostgreSQL, so that it keeps its history.

    tracker-eval ledger copy --config watch.yaml --to postgresql://evals@db:5432/evals

Stop the run's watchers (and in-training evaluation) first, copy, then give them the URL
(``ledger.url`` or TRACKER_EVAL_LEDGER_URL): they go on from the copied history. See
`tracker_eval.ledger.copying` for what is copied and when a copy is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tracker_eval.config import load_config
from tracker_eval.config.ledger import ENV_VAR, check_ledger_url
from tracker_eval.errors import ConfigError
from tracker_eval.redact import redact_text, remember_secrets


def run_ledger_copy(config_path: str, *, to: str, overrides: Sequence[str] = ()) -> int:
    """Copies the SQLite ledger of `config_path`'s ``output_dir`` into the database `to`; returns the exit code.

    Raises:
      ConfigError: `to` is not a PostgreSQL URL, there is no SQLite ledger, or the database cannot
        take the copy (another history, unreachable, privileges); one line naming the fix.
    """
    from tracker_eval.ledger.copying import copy_ledger  # noqa: PLC0415
    from tracker_eval.ledger.db import LedgerError  # noqa: PLC0415

    remember_secrets({"url": to})
    check_ledger_url(to, where="--to")
    config = load_config(config_path, overrides=overrides)
    source = Path(config.output_dir) / "ledger.sqlite"
    if not source.is_file():
        raise ConfigError(f"no SQLite ledger in output_dir={config.output_dir!r} to copy; check --config "
                          "(and its output_dir)")
    try:
        copied = copy_ledger(source, to)
    except LedgerError as error:
        raise ConfigError(str(error)) from None
    shown = redact_text(to)
    if copied.already:
        print(f"tracker-eval: nothing to copy: {shown} already holds the history of {source}")
        return 0
    counts = ", ".join(f"{n} {table}" for table, n in copied.rows.items())
    print(f"tracker-eval: copied {source} into {shown} ({counts}); set ledger.url (or {ENV_VAR}) to it, "
          f"and leave output_dir where it is: per-example results stay in {os.path.abspath(config.output_dir)}")
    return 0
