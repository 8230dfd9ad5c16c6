"""Checkpoints: which steps are finalized, what a step holds, and restoring only what evaluation needs.

The first stage of the path a result travels. `listing` decides which steps exist and are final,
`items` and `tree` read what a step holds from metadata, `restore` reads the params subtree (and
named mutable collections) straight onto the eval mesh, never the optimizer state, `describe` says
what a step holds for people, and `fswatch` notices new steps on local disks before the next poll.

May import: the shared top level only (config, errors, imports, logs).
Public names: finalized_steps, restore_eval_variables, describe_checkpoint, CheckpointError,
CorruptCheckpointError, CheckpointVanishedError, DirectoryEvents.
"""

from tracker_eval.imports import lazy_exports

_EXPORTS = {
    "finalized_steps": "listing",
    "restore_eval_variables": "restore",
    "describe_checkpoint": "describe",
    "CheckpointError": "tree",
    "CorruptCheckpointError": "tree",
    "CheckpointVanishedError": "tree",
    "DirectoryEvents": "fswatch",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
