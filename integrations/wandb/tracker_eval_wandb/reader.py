"""Reads back what W&B holds locally for a run: every offline (or online) run directory of a run id.

Offline resume starts a new ``offline-run-*`` directory on every process start (and, with our
finish-on-flush delivery, on every flush); the parts merge at ``wandb sync``. A reader must therefore
read all of them. There is no Python reader for ``.wandb`` files in wandb 0.31; we use wandb's own
``wandb leet inspect --json``, which prints one JSON record per line.

    dirs = run_dirs("runs/demo/wandb", "eval-1a2b3c")
    rows = read_history("runs/demo/wandb", "eval-1a2b3c")      # [{"checkpoint_step": 300, ...}, ...]
    held_steps("runs/demo/wandb", "eval-1a2b3c")               # {100, 300}
    held_steps("runs/demo/wandb", "eval-1a2b3c", modified_since=t)   # only files written since t
    read_table("runs/demo/wandb", "eval-1a2b3c", rows[0], "eval/harness/samples/my_mc")  # {"columns", "data"}
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

STEP_KEY = "checkpoint_step"
_DIR_PATTERN = r"^(?:offline-)?run-(\d{8}_\d{6})-{run_id}(?:-(\d+))?$"


def run_dirs(wandb_dir: str | os.PathLike[str], run_id: str) -> list[pathlib.Path]:
    """Run directories of ``run_id`` under a ``wandb/`` directory, oldest first (symlinks skipped)."""
    root = pathlib.Path(wandb_dir)
    if not root.is_dir():
        return []
    pattern = re.compile(_DIR_PATTERN.replace("{run_id}", re.escape(run_id)))
    found = []
    for path in root.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append(((match.group(1), int(match.group(2) or 0)), path))
    return [path for _, path in sorted(found)]


def read_records(path: str | os.PathLike[str], *, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """All records of one ``.wandb`` file (or run directory), as wandb's inspector prints them.

    Raises:
      RuntimeError: the inspector failed or ran past ``timeout_s``; the message has its stderr.
    """
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}  # reading needs no key
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wandb leet inspect {path} ran past {timeout_s:g} s") from None
    if out.returncode != 0:
        raise RuntimeError(f"wandb leet inspect {path} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    records = []
    for line in out.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a record being written while we read
    return records


def read_history(
    wandb_dir: str | os.PathLike[str], run_id: str, *, max_workers: int = 4, modified_since: float | None = None
) -> list[dict[str, Any]]:
    """History rows (the logged dicts) of every run directory of ``run_id``, oldest directory first.

    Args:
      wandb_dir: the ``wandb/`` directory.
      run_id: the run id.
      max_workers: inspector processes run at once.
      modified_since: read only ``.wandb`` files last written at or after this unix time.
    """
    files = [f for d in run_dirs(wandb_dir, run_id) for f in sorted(d.glob("run-*.wandb"))
             if modified_since is None or f.stat().st_mtime >= modified_since]
    if not files:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
        per_file = list(pool.map(read_records, files))
    rows = []
    for records in per_file:
        for record in records:
            if record.get("type") == "history":
                rows.append(dict(record["history"].get("item", {})))
    return rows


def held_steps(
    wandb_dir: str | os.PathLike[str], run_id: str, *, prefix: str = "eval", modified_since: float | None = None
) -> set[int]:
    """Checkpoint steps whose ``<prefix>/...`` row the run already holds on disk (in the files
    written at or after `modified_since`, when given)."""
    marker = f"{prefix}/" if prefix else ""
    steps = set()
    for row in read_history(wandb_dir, run_id, modified_since=modified_since):
        if STEP_KEY in row and any(k.startswith(marker) for k in row if k != STEP_KEY):
            steps.add(int(row[STEP_KEY]))
    return steps


def read_table(wandb_dir: str | os.PathLike[str], run_id: str, row: dict[str, Any], key: str) -> dict[str, Any]:
    """The columns and data of the table logged under `key` in a history row (from `read_history`).

    A row holds only a reference (``<key>.path``, under the run directory's ``files/``); the file is
    looked for in every run directory of the run, newest first.

    Raises:
      KeyError: the row has no table under `key`.
      FileNotFoundError: no run directory holds the table's file.
    """
    if row.get(f"{key}._type") != "table-file":
        raise KeyError(f"the row has no table under {key!r}; its keys: {sorted(row)}")
    relative = row[f"{key}.path"]
    for directory in reversed(run_dirs(wandb_dir, run_id)):
        path = directory / "files" / relative
        if path.is_file():
            data = json.loads(path.read_text())
            return {"columns": data["columns"], "data": data["data"]}
    raise FileNotFoundError(f"no run directory of {run_id} under {wandb_dir} holds {relative}")


def read_summary_updates(wandb_dir: str | os.PathLike[str], run_id: str) -> dict[str, Any]:
    """The run's summary as the merged result of every summary update on disk, oldest first."""
    files = [f for d in run_dirs(wandb_dir, run_id) for f in sorted(d.glob("run-*.wandb"))]
    summary: dict[str, Any] = {}
    for path in files:
        for record in read_records(path):
            if record.get("type") == "summary":
                summary.update(record["summary"].get("update", {}))
    return summary


def read_alerts(wandb_dir: str | os.PathLike[str], run_id: str) -> list[dict[str, Any]]:
    """Every alert the run's files hold (``run.alert``: title, text, level), oldest first."""
    files = [f for d in run_dirs(wandb_dir, run_id) for f in sorted(d.glob("run-*.wandb"))]
    return [record["alert"] for path in files for record in read_records(path) if record.get("type") == "alert"]
