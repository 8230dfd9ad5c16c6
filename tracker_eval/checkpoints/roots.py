"""What a CheckpointManager root holds: how its step folders are named, and whether it is a root at all.

    names = StepNames(prefix="checkpoint")        # CheckpointManagerOptions(step_prefix="checkpoint")
    names.folder(20)                              # "checkpoint_20"
    names.step_of("checkpoint_20")                # 20; None for "20" or "checkpoint_20.orbax-checkpoint-tmp"
    detect(["checkpoint_10", "checkpoint_20"])    # StepNames(prefix="checkpoint")
    strays(StepNames(), ["checkpoint_10"])        # ["checkpoint_10"]: looks like a step, is not read

Orbax names a step `<N>`, `<prefix>_<N>`, or either with `<N>` zero-padded to a fixed length
(`CheckpointManagerOptions.step_prefix`, `step_format_fixed_length`). Trainers differ: xlstm-jax
writes `checkpoint_<N>`, MaxText and Orbax's default `<N>`. A name is read as a step only if the
format writes exactly that name back, so `restore` finds the folder the lister saw. Both listers
(local and gs://) and the restore path share these rules; nothing here touches storage.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from tracker_eval.errors import ConfigError

LOG = logging.getLogger("tracker_eval")
# (root, names) said once per process: `eval` lists the root and then restores from it.
_SAID: set[tuple[str, StepNames]] = set()

# Written by every CheckpointManager save; names each item and the handler that wrote it.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
# Written by the PyTree/Standard handlers into each pytree item.
PYTREE_METADATA_FILE = "_METADATA"
# Marks a step folder Orbax is still writing (`<name>.orbax-checkpoint-tmp`, a timestamp in older versions).
TMP_MARK = ".orbax-checkpoint-tmp"

# Orbax's shapes; ASCII digits only. Detected prefixes are word-like: an item's own folders
# (`ocdbt.process_0`) must not pass for steps.
_NUMBERED = re.compile(r"(?:(?P<prefix>[A-Za-z0-9_-]+)_)?(?P<digits>[0-9]+)")
_DIGITS = re.compile(r"[0-9]+")
_ENDS_IN_NUMBER = re.compile(r".*[0-9]")


@dataclasses.dataclass(frozen=True)
class StepNames:
    """One step-folder name format, as Orbax's `standard_name_format` writes it.

    Attributes:
        prefix: `step_prefix`: folders are `<prefix>_<N>`; None for plain `<N>`.
        fixed_length: `step_format_fixed_length`: `<N>` zero-padded to this many digits; None for none.
    """

    prefix: str | None = None
    fixed_length: int | None = None

    @classmethod
    def configured(cls, step_prefix: str | None, fixed_length: int | None) -> StepNames | None:
        """The format `checkpoint.step_prefix`/`step_format_fixed_length` set; None = detect it.

        An empty `step_prefix` means plain `<N>` without detection.
        """
        if step_prefix is None and fixed_length is None:
            return None
        return cls(prefix=step_prefix or None, fixed_length=fixed_length)

    def folder(self, step: int) -> str:
        """The folder name of `step`."""
        digits = f"{int(step):0{self.fixed_length}d}" if self.fixed_length else str(int(step))
        return f"{self.prefix}_{digits}" if self.prefix else digits

    def step_of(self, name: str) -> int | None:
        """The step a folder name stands for, or None when this format would not write that name."""
        if self.prefix is None and self.fixed_length is None:  # Orbax's default, the common case
            return int(name) if name.isascii() and name.isdigit() and (name == "0" or name[0] != "0") else None
        digits = name
        if self.prefix is not None:
            if not name.startswith(f"{self.prefix}_"):
                return None
            digits = name[len(self.prefix) + 1 :]
        if not _DIGITS.fullmatch(digits):
            return None
        step = int(digits)
        return step if self.folder(step) == name else None

    def pattern(self) -> str:
        """The names, for people: `checkpoint_<N>`, `<N>`, `<N zero-padded to 8 digits>`."""
        number = f"<N zero-padded to {self.fixed_length} digits>" if self.fixed_length else "<N>"
        return f"{self.prefix}_{number}" if self.prefix else number

    def settings(self) -> str:
        """The `checkpoint:` settings that read these names."""
        parts = ["checkpoint.step_prefix: " + (self.prefix or "''")]
        if self.fixed_length:
            parts.append(f"checkpoint.step_format_fixed_length: {self.fixed_length}")
        return ", ".join(parts)


DEFAULT_NAMES = StepNames()
"""Orbax's default: plain `<N>`."""


def detect(names: Iterable[str]) -> StepNames | None:
    """The format of the step folders among `names` (folder names directly under a root).

    Plain numbers win when there are any (Orbax's default: a root that holds them is read as
    before). Otherwise the one `<prefix>_<N>` shared by the numbered folders; None when there
    is none, or several prefixes (then `strays` names them all and the user picks one).
    """
    names = list(names)
    plain = [name for name in names if name.isascii() and name.isdigit()]  # no regex for the common case
    if plain:
        return _with_padding(None, plain)
    found: dict[str | None, list[str]] = {}
    for name in names:
        match = None if TMP_MARK in name else _NUMBERED.fullmatch(name)
        if match is not None:
            found.setdefault(match["prefix"], []).append(match["digits"])
    if len(found) == 1:
        ((prefix, digits),) = found.items()
        return _with_padding(prefix, digits)
    return None


def _with_padding(prefix: str | None, digits: list[str]) -> StepNames | None:
    padded = {len(d) for d in digits if len(d) > 1 and d.startswith("0")}
    if len(padded) > 1:
        return None
    names = StepNames(prefix=prefix, fixed_length=padded.pop() if padded else None)
    readable = all(names.step_of(f"{prefix}_{d}" if prefix else d) is not None for d in digits)
    return names if readable else None


def strays(names: StepNames, folders: Iterable[str]) -> list[str]:
    """Folders that look like checkpoint steps (a name ending in a number, not a temporary one)
    but that `names` does not read; sorted."""
    return sorted(f for f in folders if TMP_MARK not in f and _ENDS_IN_NUMBER.fullmatch(f) and names.step_of(f) is None)


def stray_notice(location: str, names: StepNames, found: list[str], *, how: str) -> str:
    """One line saying which folders are not read and the setting that would read them.

    Args:
        location: The root.
        names: The step names read.
        found: The folders not read (`strays`).
        how: Where `names` came from: set, detected, or Orbax's default.
    """
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    fit = detect(found)
    remedy = (
        f"set {fit.settings()} to read them" if fit is not None
        else "Orbax names steps <N> or <prefix>_<N>; set checkpoint.step_prefix (and "
        "checkpoint.step_format_fixed_length for zero-padded numbers) to the trainer's CheckpointManager options"
    )
    return (f"checkpoint_dir {location!r} holds {len(found)} folder(s) that look like checkpoints but do not match "
            f"the step names {names.pattern()} ({how}): {shown}; {remedy}")


def configured_names(checkpoint: Any) -> StepNames | None:
    """The `StepNames` a `CheckpointConfig` sets; None = detect them."""
    return StepNames.configured(checkpoint.step_prefix, checkpoint.step_format_fixed_length)


class RootNaming:
    """The step names of one root across a lister's polls: configured, or detected and said once.

    Args:
        location: The root, for messages.
        configured: The format `checkpoint:` sets; None detects it on every listing (a root that
            has no step yet may get its first one in any format).
    """

    def __init__(self, location: str, configured: StepNames | None) -> None:
        self.location = location
        self.configured = configured
        self.names = configured or StepNames()
        self.notice: str | None = None

    def read(self, folders: Iterable[str]) -> dict[int, str]:
        """{step: folder name} of the folders that are steps; updates `names` and `notice`."""
        folders = list(folders)
        how = "set"
        if self.configured is None:
            detected = detect(folders)
            self.names = detected or DEFAULT_NAMES
            how = "Orbax's default" if detected is None else "detected"
            if self.names != DEFAULT_NAMES and (self.location, self.names) not in _SAID:
                _SAID.add((self.location, self.names))
                LOG.info("tracker-eval: checkpoint_dir %r: step folders are named %s (detected; %s sets it)",
                         self.location, self.names.pattern(), self.names.settings())
        steps = {}
        unread = []
        for folder in folders:  # one pass: a poll of 1,000 steps stays in milliseconds
            step = self.names.step_of(folder)
            if step is not None:
                steps[step] = folder
            elif TMP_MARK not in folder and _ENDS_IN_NUMBER.fullmatch(folder):
                unread.append(folder)
        unread.sort()
        self.notice = stray_notice(self.location, self.names, unread, how=how) if unread else None
        return steps



class NamedRoot:
    """What a step lister says of its root's names (`step_names`, `notice`), read off its `RootNaming`."""

    _naming: RootNaming

    @property
    def step_names(self) -> StepNames:
        return self._naming.names

    @property
    def notice(self) -> str | None:
        """One line on folders that look like steps but match no step name; None when there are none."""
        return self._naming.notice


def check_is_root(
    location: str, *, steps: list[int], names: Iterable[str], parent: Callable[[str], str]
) -> None:
    """Raises when a root without steps holds a step's or an item's own metadata file.

    Args:
        location: The configured root.
        steps: The finalized steps found.
        names: The names directly under the root.
        parent: Maps a location to its parent (differs for local paths and URLs).

    Raises:
        ConfigError: The root is one step or one item, naming the likely root.
    """
    names = set(names)
    if steps or not (STEP_METADATA_FILE in names or PYTREE_METADATA_FILE in names):
        return
    is_step = STEP_METADATA_FILE in names
    kind = "one checkpoint step" if is_step else "one checkpoint item"
    up = parent(location.rstrip("/"))
    likely_root = up if is_step else parent(up)
    raise ConfigError(
        f"checkpoint_dir {location!r} looks like {kind}, not a CheckpointManager root; set "
        f"checkpoint_dir to the directory that holds the step directories (likely {likely_root!r})"
    )


def file_not_root(location: str) -> ConfigError:
    return ConfigError(
        f"checkpoint_dir {location!r} is a file; set checkpoint_dir to the CheckpointManager "
        "root directory that holds one folder per checkpoint step"
    )
