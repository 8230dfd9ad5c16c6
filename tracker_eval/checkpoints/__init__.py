"""Checkpoints: which steps are finalized, what a step holds, and restoring only what evaluation needs.

The first stage of the path a result travels. `roots` knows how a root names its step folders
(`<N>`, `checkpoint_<N>`, zero-padded; set or detected) and whether a location is a root at all;
`listing` decides which steps exist and are final (a `StepLister` per kind of storage: a local
directory, or a GCS bucket through `gcs`); `items` and `tree` read what a step holds from
metadata; `restore` reads the params subtree (and named mutable collections) straight onto the
eval mesh, never the optimizer state, and `boxes` takes flax's partitioning boxes off; `describe`
says what a step holds for people, `fswatch` notices new steps on local disks before the next
poll, and `remote` sets how the storage libraries under Orbax behave on object storage.
Dependencies run one way: `roots`, then `tree`, below every other module; `gcs` below `listing`;
`items` below `restore` and `describe`; nothing imports upward.

May import: the shared top level only (config, errors, imports, locations, logs).
Public names: finalized_steps, open_lister, StepLister, restore_eval_variables, describe_checkpoint,
CheckpointError, CorruptCheckpointError, CheckpointVanishedError, CheckpointUnreachableError,
StorageUnavailableError, StorageLocationMissingError, DirectoryEvents.
"""

from tracker_eval.imports import lazy_exports

_EXPORTS = {
    "finalized_steps": "listing",
    "open_lister": "listing",
    "StepLister": "listing",
    "restore_eval_variables": "restore",
    "describe_checkpoint": "describe",
    "CheckpointError": "tree",
    "CorruptCheckpointError": "tree",
    "CheckpointVanishedError": "tree",
    "CheckpointUnreachableError": "tree",
    "StorageUnavailableError": "tree",
    "StorageLocationMissingError": "tree",
    "DirectoryEvents": "fswatch",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
