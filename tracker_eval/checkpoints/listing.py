"""Which checkpoint steps are finalized: the one question the watcher asks on every poll.

    steps = finalized_steps("/ckpts/run1")   # [20, 40, 60], oldest first; [] before the first save

A step appears here only once Orbax has finalized it, by Orbax's own rule for the storage at hand,
so an in-progress save is never evaluated.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from etils import epath

from tracker_eval.checkpoints.tree import _PYTREE_METADATA_FILE, _is_local
from tracker_eval.errors import ConfigError

# Written by every CheckpointManager save; names each item and the handler that wrote it.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


def _finalized_by_rename(root: epath.Path) -> bool:
    # Orbax decides per storage how a step is finalized: on local and POSIX-like storage by an
    # atomic rename from `<step>.orbax-checkpoint-tmp`, on GCS by a commit_success.txt file.
    path_cls = ocp.path.atomicity_defaults.get_default_temporary_path_class(root)
    return path_cls is ocp.path.atomicity.AtomicRenameTemporaryPath


def finalized_steps(checkpoint_dir: str | os.PathLike[str]) -> list[int]:
    """Lists the finalized steps under a CheckpointManager root, oldest first.

    Applies Orbax's own finalization rule for the storage at hand. Where finalization is an atomic
    rename (local disks, most mounted filesystems), a step directory is final once its name is a
    plain step number, so one directory listing decides every step (~1 ms for 1,000 steps, where
    `ocp.utils.checkpoint_steps` takes ~1 s because it checks each step in its own event loop).
    Elsewhere (GCS: `commit_success.txt`) Orbax's per-step check is used. In-progress
    `<step>.orbax-checkpoint-tmp*` directories are never listed. Steps use Orbax's default name
    format (`<root>/<step>`, no prefix).

    Args:
        checkpoint_dir: The CheckpointManager root, a local path or any URL epath supports.

    Returns:
        Sorted finalized steps; [] when the directory does not exist yet (training has not
        written its first checkpoint) or holds no finalized step.

    Raises:
        ConfigError: `checkpoint_dir` is a file, or is itself a step or item directory rather
            than the root that holds the step directories.
    """
    root = epath.Path(checkpoint_dir)
    if _is_local(root) and _finalized_by_rename(root):
        try:
            with os.scandir(os.fspath(root)) as entries:
                # DirEntry.is_dir() comes from the directory listing itself: no stat per step.
                listed = {e.name: e.is_dir() for e in entries}
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise ConfigError(
                f"checkpoint_dir {os.fspath(root)!r} is a file; set checkpoint_dir to the CheckpointManager "
                "root directory that holds one <step>/ directory per checkpoint"
            ) from None
        names = set(listed)
        steps = sorted(int(n) for n, is_dir in listed.items() if is_dir and n.isdigit())
    else:
        if not root.exists():
            return []
        if not root.is_dir():
            raise ConfigError(
                f"checkpoint_dir {os.fspath(root)!r} is a file; set checkpoint_dir to the CheckpointManager "
                "root directory that holds one <step>/ directory per checkpoint"
            )
        names = {p.name for p in root.iterdir()}
        steps = sorted(int(p.name) for p in ocp.step.checkpoint_steps_paths(root) if p.name.isdigit())
    if not steps and (STEP_METADATA_FILE in names or _PYTREE_METADATA_FILE in names):
        is_step = STEP_METADATA_FILE in names
        kind = "one checkpoint step" if is_step else "one checkpoint item"
        likely_root = root.parent if is_step else root.parent.parent
        raise ConfigError(
            f"checkpoint_dir {os.fspath(root)!r} looks like {kind}, not a CheckpointManager root; set "
            f"checkpoint_dir to the directory that holds the <step>/ directories (likely {os.fspath(likely_root)!r})"
        )
    return steps

