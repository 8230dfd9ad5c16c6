"""A user's task folder as lm-eval sees it from anywhere: relative data paths made absolute.

    shim_dir = write_shims("configs/tasks", into=tmp)   # index shim_dir instead of configs/tasks

lm-eval resolves `include:` and `!function` against a YAML's own folder but `dataset_kwargs.data_files`
(and a local `dataset_path`) against the working directory, so a task folder would only work from
inside it. Each YAML gets a shim `{include: <the original>, dataset_kwargs: {data_files: <absolute>}}`
in a folder of our own: local keys override the included ones, everything else (templates,
`!function`, groups) still comes from the original file, which is never modified.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import yaml


def _absolute(value: Any, base: pathlib.Path) -> Any:
    if isinstance(value, str):
        return value if os.path.isabs(value) or "://" in value else str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def write_shims(task_dir: str | os.PathLike[str], *, into: str | os.PathLike[str]) -> pathlib.Path:
    """Writes one shim per `*.yaml` under `task_dir` (same relative layout) into `into`.

    Returns:
      The folder to give lm-eval's TaskManager in place of `task_dir`.
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # noqa: PLC0415 - lm-eval's own reading of includes

    source = pathlib.Path(task_dir).resolve()
    target = pathlib.Path(into)
    for path in sorted(source.rglob("*.yaml")):
        try:
            merged = load_yaml(path, resolve_func=False)
        except Exception:  # noqa: BLE001 - lm-eval's index skips unreadable YAMLs the same way
            continue
        shim: dict[str, Any] = {"include": str(path)}
        kwargs = merged.get("dataset_kwargs")
        if isinstance(kwargs, dict) and "data_files" in kwargs:
            shim["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], path.parent)}
        dataset_path = merged.get("dataset_path")
        if isinstance(dataset_path, str) and not os.path.isabs(dataset_path) \
                and (path.parent / dataset_path).exists():
            shim["dataset_path"] = str((path.parent / dataset_path).resolve())
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(shim, sort_keys=False))
    return target
