"""The items of one checkpoint step and the handlers that wrote them; which item holds the train state.

    step_dir = step_path("/ckpts/run1", 20)        # <root>/20
    step_dir = step_path("/ckpts/run1", 20, step_names=StepNames(prefix="checkpoint"))  # .../checkpoint_20
    require_step(step_dir, 20)                     # CheckpointVanishedError when deleted meanwhile
    item = resolve_item(None, step_dir, 20)        # the only pytree item, e.g. "default" or "state"
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from etils import epath

from tracker_eval.checkpoints.remote import fresh_remote_listings
from tracker_eval.checkpoints.roots import DEFAULT_NAMES, PYTREE_METADATA_FILE, STEP_METADATA_FILE, StepNames
from tracker_eval.checkpoints.tree import (
    CheckpointUnreachableError,
    CheckpointVanishedError,
    _is_local,
    step_exists,
)
from tracker_eval.errors import ConfigError, one_line


def step_path(
    checkpoint_dir: str | os.PathLike[str], step: int, *, step_names: StepNames = DEFAULT_NAMES
) -> epath.Path:
    fresh_remote_listings(checkpoint_dir)
    return epath.Path(checkpoint_dir) / step_names.folder(step)


def require_step(step_dir: epath.Path, step: int) -> None:
    """Raises unless the step is (still) there.

    Raises:
        CheckpointVanishedError: The step was deleted.
        CheckpointUnreachableError: The storage did not answer.
    """
    path = os.fspath(step_dir)
    try:
        # Remote: exists(), since fsspec's is_dir() answers False for any error (see step_exists).
        present = step_dir.is_dir() if _is_local(step_dir) else step_exists(step_dir)
    except Exception as error:  # noqa: BLE001 - whatever the storage raised, it did not answer
        raise CheckpointUnreachableError(
            f"checkpoint step {step} at {path} could not be checked: {type(error).__name__}: "
            f"{one_line(error, limit=300)}",
            step=step,
            path=path,
        ) from error
    if not present:
        raise CheckpointVanishedError(
            f"checkpoint step {step} no longer exists at {path} (deleted, e.g. by retention)", step=step, path=path
        )


def item_handlers(step_dir: epath.Path) -> dict[str, str]:
    """{item: handler class name} from the step metadata, else from the item directories."""
    try:
        recorded = json.loads((step_dir / STEP_METADATA_FILE).read_text()).get("item_handlers")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, Mapping):
        return {str(name): str(handler).rsplit(".", 1)[-1] for name, handler in recorded.items()}
    # Checkpoints written without a CheckpointManager, or by Orbax before 0.7 (its step metadata
    # holds timestamps only), say nothing of handlers: each subdirectory is an item and a
    # `_METADATA` file marks a pytree one.
    return {
        p.name: ("PyTreeCheckpointHandler" if (p / PYTREE_METADATA_FILE).exists() else "unknown")
        for p in step_dir.iterdir()
        if p.is_dir() and not p.name.startswith(("_", "."))
    }


def is_pytree(handler: str) -> bool:
    # StandardCheckpointHandler writes the PyTreeCheckpointHandler format.
    return handler.endswith(("PyTreeCheckpointHandler", "StandardCheckpointHandler"))


def resolve_item(item: str | None, step_dir: epath.Path, step: int) -> str:
    handlers = item_handlers(step_dir)
    listing = ", ".join(f"{n} ({h})" for n, h in sorted(handlers.items())) or "no items"
    where = f"step {step} at {os.fspath(step_dir)}"
    if item is None:
        candidates = sorted(name for name, handler in handlers.items() if is_pytree(handler))
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ConfigError(
                f"checkpoint.item is null but {where} holds no pytree item ({listing}); point "
                "checkpoint_dir at checkpoints saved with StandardSave/PyTreeSave"
            )
        raise ConfigError(
            f"checkpoint.item is null but {where} holds several pytree items: {', '.join(candidates)} "
            f"(all items: {listing}); set checkpoint.item to the one holding the train state"
        )
    if item not in handlers:
        raise ConfigError(
            f"checkpoint.item {item!r} not found in {where}; its items are: {listing}; set "
            "checkpoint.item to one of them (null picks the only pytree item)"
        )
    if not is_pytree(handlers[item]):
        raise ConfigError(
            f"checkpoint.item {item!r} in {where} is not a pytree item ({listing}); set checkpoint.item "
            "to the item saved with StandardSave/PyTreeSave"
        )
    return item

