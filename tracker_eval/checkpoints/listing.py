"""Which checkpoint steps are finalized: the one question the watcher asks on every poll.

    steps = finalized_steps("/ckpts/run1")   # [20, 40, 60], oldest first; [] before the first save

    lister = open_lister("gs://bucket/run1")   # the watcher keeps one across polls
    steps = lister.finalized_steps()
    lister.step_names.folder(steps[-1])        # "60", or "checkpoint_60" for xlstm-jax's trainer
    lister.notice                              # a line when folders look like steps but are not read
    lister.close()

A step appears here only once Orbax has finalized it, by Orbax's own rule for the storage at hand,
so an in-progress save is never evaluated. Step folders are named as `checkpoint.step_prefix` says,
or as detected from the folder names (`tracker_eval.checkpoints.roots`). `open_lister` picks the
lister from the location: a local directory (one `scandir`), a GCS bucket
(`tracker_eval.checkpoints.gcs`, a few JSON-API requests), or any other URL etils.epath reads
(Orbax's per-step check). The watcher sees only the `StepLister` protocol.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import orbax.checkpoint as ocp
from etils import epath

from tracker_eval.checkpoints.roots import NamedRoot, RootNaming, StepNames, check_is_root, file_not_root
from tracker_eval.checkpoints.tree import StorageUnavailableError, _is_local


class StepLister(Protocol):
    """Lists the finalized steps of one CheckpointManager root; kept open across polls."""

    location: str
    """The root, as configured (`checkpoint_dir`)."""

    @property
    def step_names(self) -> StepNames:
        """The step folder names read, as configured or detected by the last listing."""
        ...

    @property
    def notice(self) -> str | None:
        """After a listing: one line when folders look like steps but match no step name read."""
        ...

    def finalized_steps(self) -> list[int]:
        """Sorted finalized steps; [] while the root does not exist yet.

        Raises:
            StorageUnavailableError: The storage did not answer; ask again later.
            ConfigError: The root is a file, a step or an item directory.
        """
        ...

    def close(self) -> None:
        """Releases connections."""
        ...


def open_lister(checkpoint_dir: str | os.PathLike[str], *, step_names: StepNames | None = None) -> StepLister:
    """The lister for this location: GCS bucket, local directory, or Orbax's generic rule.

    Args:
        checkpoint_dir: The CheckpointManager root.
        step_names: How step folders are named; None detects it from the folder names.

    Raises:
        ConfigError: A malformed gs:// URL, or no Google credentials for a real bucket.
    """
    location = os.fspath(checkpoint_dir)
    if location.startswith("gs://"):
        from tracker_eval.checkpoints.gcs import GcsStepLister  # noqa: PLC0415 - requests/google-auth

        return GcsStepLister(location, step_names=step_names)
    root = epath.Path(location)
    if _is_local(root) and _finalized_by_rename(root):
        return LocalStepLister(location, step_names=step_names)
    return OrbaxStepLister(location, step_names=step_names)


def finalized_steps(checkpoint_dir: str | os.PathLike[str], *, step_names: StepNames | None = None) -> list[int]:
    """Lists the finalized steps under a CheckpointManager root once, oldest first.

    Args:
        checkpoint_dir: The CheckpointManager root, a local path or a URL (gs://, or any URL
            etils.epath supports).
        step_names: How step folders are named (`checkpoint.step_prefix`); None detects it.

    Returns:
        Sorted finalized steps; [] when the root does not exist yet (training has not written
        its first checkpoint) or holds no finalized step.

    Raises:
        ConfigError: `checkpoint_dir` is a file, or is itself a step or item directory rather
            than the root that holds the step directories.
        StorageUnavailableError: The storage did not answer.
    """
    lister = open_lister(checkpoint_dir, step_names=step_names)
    try:
        return lister.finalized_steps()
    finally:
        lister.close()


@dataclasses.dataclass(frozen=True)
class Survey:
    """One listing of a root, with what it says about step names."""

    steps: list[int]
    step_names: StepNames
    notice: str | None


def survey(checkpoint_dir: str | os.PathLike[str], *, step_names: StepNames | None = None) -> Survey:
    """`finalized_steps`, with the step names read and the line about folders not read (if any).

    Raises:
        ConfigError: As `finalized_steps`.
        StorageUnavailableError: The storage did not answer.
    """
    lister = open_lister(checkpoint_dir, step_names=step_names)
    try:
        steps = lister.finalized_steps()
        return Survey(steps=steps, step_names=lister.step_names, notice=lister.notice)
    finally:
        lister.close()


def read_step_names(checkpoint_dir: str | os.PathLike[str], *, step_names: StepNames | None = None) -> StepNames:
    """The step folder names of a root: `step_names` when set, else detected from one listing.

    Raises:
        ConfigError: As `finalized_steps`.
        StorageUnavailableError: The storage did not answer.
    """
    return step_names if step_names is not None else survey(checkpoint_dir).step_names


class LocalStepLister(NamedRoot):
    """A local directory, finalized by atomic rename: one `scandir` decides every step.

    A step directory is final once its name is a step name (`<name>.orbax-checkpoint-tmp*` is
    renamed to `<name>` last). 2-7 ms for 1,000 steps on a busy 2-core machine (the upper end when
    `<prefix>_<N>` names are detected on every poll), where `ocp.utils.checkpoint_steps` takes ~1 s
    because it checks each step in its own event loop.
    """

    def __init__(self, location: str, *, step_names: StepNames | None = None) -> None:
        self.location = location
        self._naming = RootNaming(location, step_names)

    def finalized_steps(self) -> list[int]:
        try:
            with os.scandir(self.location) as entries:
                # DirEntry.is_dir() comes from the directory listing itself: no stat per step.
                listed = {e.name: e.is_dir() for e in entries}
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise file_not_root(self.location) from None
        except OSError as error:  # EIO, a stale NFS handle: the disk may come back
            raise StorageUnavailableError(f"cannot list {self.location}: {error}") from error
        steps = sorted(self._naming.read(n for n, is_dir in listed.items() if is_dir))
        check_is_root(self.location, steps=steps, names=listed, parent=os.path.dirname)
        return steps

    def close(self) -> None:
        pass


class OrbaxStepLister(NamedRoot):
    """Any other storage etils.epath reads: Orbax's own per-step finalization check (~10 requests
    per step on object storage; GCS has its own lister)."""

    def __init__(self, location: str, *, step_names: StepNames | None = None) -> None:
        self.location = location
        self._naming = RootNaming(location, step_names)

    def finalized_steps(self) -> list[int]:
        root = epath.Path(self.location)
        if not root.exists():
            return []
        if not root.is_dir():
            raise file_not_root(self.location)
        children = list(root.iterdir())
        names = {p.name for p in children}
        found = self._naming.read(p.name for p in children if p.is_dir())
        finalized = {p.name for p in ocp.step.checkpoint_steps_paths(root)}
        steps = sorted(step for step, folder in found.items() if folder in finalized)
        check_is_root(self.location, steps=steps, names=names, parent=lambda p: os.fspath(epath.Path(p).parent))
        return steps

    def close(self) -> None:
        pass


def _finalized_by_rename(root: epath.Path) -> bool:
    # Orbax decides per storage how a step is finalized: on local and POSIX-like storage by an
    # atomic rename from `<step>.orbax-checkpoint-tmp`, on GCS by a commit_success.txt file.
    path_cls = ocp.path.atomicity_defaults.get_default_temporary_path_class(root)
    return path_cls is ocp.path.atomicity.AtomicRenameTemporaryPath
