"""The event files of one TensorBoard run: one live file appended in step order, rewritten on a late step.

TensorBoard's default server (its Rust data loader) drops every point of a tag at or above step s
when a record at step s follows higher steps of that tag in the run (files in name order, then
record order); its Python readers read files in name order and skip a file that appears later under
a lower name. So in a run written here, each tag's steps never decrease in that order:

* an event whose steps are at or above every held step of its tags is appended to the live file
  (``events.out.tfevents.<generation>.tracker-eval``) and fsynced;
* a late (lower) step makes the next generation instead: every held record and the new ones,
  sorted by step (held records copied byte for byte) after a session start at the lowest step,
  written under a temporary name without "tfevents" (no reader looks at it), fsynced and renamed
  in; then the older generation is emptied, and removed `EMPTY_KEEP_S` later. A live server reads
  the new file after the old one, so its late low step is followed by the higher steps again and
  nothing stays hidden; a live Python loader drops its points at or above the session start;
* the highest generation replaces all lower ones: a crash between the rename and emptying the old
  file is repaired by the next writer (a fresh reader may see the run twice only in that window);
* a torn tail (a crash or a failed write mid-append) is never appended to; the next write compacts.

Writers of one run, in any process, serialize on an exclusive ``flock`` of ``<run>/.tracker-eval.lock``.

    log = RunLog("runs/x/tensorboard/eval-1a2b3c4d5e")
    with log.locked() as changes:   # what the files hold that this object has not seen yet
        ...                         # changes.reset: forget what you knew; changes.events: Event protos
        log.write([event, ...])     # appended (fsynced) or compacted into the next generation
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import re
import time
from collections.abc import Iterator, Sequence

from tensorboard.compat.proto import event_pb2

from tracker_eval_tensorboard.records import frame, scan_records

FILE_PATTERN = re.compile(r"^events\.out\.tfevents\.(\d{10})\.tracker-eval$")
LOCK_NAME = ".tracker-eval.lock"
TMP_PREFIX = ".tracker-eval-tmp-"  # never contains "tfevents": readers ignore it
FILE_VERSION = "brain.Event:2"  # without it, readers purge a tag's higher steps when a lower one follows
EMPTY_KEEP_S = 300.0  # how long an emptied generation stays for live readers that are still on it


def generation_name(generation: int) -> str:
    """File name of a generation; zero-padded so that name order is generation order."""
    return f"events.out.tfevents.{generation:010d}.tracker-eval"


@dataclasses.dataclass(frozen=True)
class Changes:
    """Events of the run that a `RunLog` had not seen before this `locked()` block.

    Attributes:
      reset: the run was read from its start (first use, or another writer compacted it): what the
        caller knew about the run is replaced by ``events``.
      events: ``Event`` protos holding a summary, in file order.
    """

    reset: bool
    events: list[event_pb2.Event]


@dataclasses.dataclass(frozen=True)
class _Entry:
    step: int
    tags: tuple[str, ...]
    start: int
    end: int


class RunLog:
    """Reads and writes the event files tracker-eval keeps in one run directory."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = pathlib.Path(run_dir)
        self.compactions = 0  # generations this object wrote to replace an older one (tests, benchmarks)
        self._generation: int | None = None
        self._size = 0  # bytes of complete records known in the live file
        self._torn = False
        self._start_wall_time: float | None = None
        self._entries: list[_Entry] = []
        self._tag_max: dict[str, int] = {}
        self._locked = False

    @property
    def path(self) -> pathlib.Path | None:
        """The live event file, or None before anything was written."""
        return None if self._generation is None else self.run_dir / generation_name(self._generation)

    @contextlib.contextmanager
    def locked(self) -> Iterator[Changes]:
        """Holds the run's write lock and brings this object up to date with the files.

        Yields:
          The `Changes` since this object last looked (everything, the first time).
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._locked = True
            yield self._sync()
        finally:
            self._locked = False
            os.close(fd)  # releases the lock

    def write(self, events: Sequence[event_pb2.Event]) -> str:
        """Writes events durably (fsynced); call inside `locked()`.

        Returns:
          ``"append"`` or ``"compact"`` (a new generation), or ``""`` when there was nothing to write.
        """
        if not self._locked:
            raise RuntimeError("RunLog.write must be called inside `with run_log.locked():`")
        if not events:
            return ""
        new = [(ev, tuple(v.tag for v in ev.summary.value), ev.SerializeToString()) for ev in events]
        tag_max = dict(self._tag_max)
        late = False
        for ev, tags, _ in new:
            for tag in tags:
                late = late or ev.step < tag_max.get(tag, ev.step)
                tag_max[tag] = max(ev.step, tag_max.get(tag, ev.step))
        if self._generation is None or self._torn or late or not self._append(new):
            self._compact(new)
            return "compact"
        return "append"

    def _sync(self) -> Changes:
        names = os.listdir(self.run_dir)
        generations = sorted(int(m.group(1)) for name in names if (m := FILE_PATTERN.match(name)))
        changed = False
        for name in names:
            if name.startswith(TMP_PREFIX):  # a writer that died mid-compaction (we hold the lock)
                os.unlink(self.run_dir / name)
                changed = True
        for generation in generations[:-1]:  # replaced by the newest, which holds all they held
            changed = _retire(self.run_dir / generation_name(generation)) or changed
        if changed:
            _fsync_dir(self.run_dir)
        if not generations:
            reset = self._generation is not None
            self._forget(None)
            return Changes(reset=reset, events=[])
        newest = generations[-1]
        size = (self.run_dir / generation_name(newest)).stat().st_size
        reset = newest != self._generation or size < self._size
        if reset:
            self._forget(newest)
        elif size == self._size:
            return Changes(reset=False, events=[])
        scan = scan_records(self.run_dir / generation_name(newest), start=self._size)
        events = []
        for record in scan.records:
            try:
                event = event_pb2.Event.FromString(record.payload)
            except Exception:  # noqa: BLE001 - checksum-valid but not an Event: treat like a torn tail
                scan = dataclasses.replace(scan, end=record.start, torn=True)
                break
            if self._start_wall_time is None:
                self._start_wall_time = event.wall_time
            if event.HasField("summary"):
                self._note(event.step, tuple(v.tag for v in event.summary.value), record.start, record.end)
                events.append(event)
        self._size = scan.end
        self._torn = scan.torn
        return Changes(reset=reset, events=events)

    def _forget(self, generation: int | None) -> None:
        self._generation = generation
        self._size = 0
        self._torn = False
        self._start_wall_time = None
        self._entries = []
        self._tag_max = {}

    def _note(self, step: int, tags: tuple[str, ...], start: int, end: int) -> None:
        self._entries.append(_Entry(step, tags, start, end))
        for tag in tags:
            self._tag_max[tag] = max(step, self._tag_max.get(tag, step))

    def _append(self, new: list[tuple[event_pb2.Event, tuple[str, ...], bytes]]) -> bool:
        path = self.path
        assert path is not None
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.fstat(fd).st_size != self._size:
                return False  # bytes we cannot account for: rewrite rather than append after them
            start = self._size
            spans = []
            chunks = []
            for event, tags, payload in new:
                framed = frame(payload)
                spans.append((event.step, tags, start, start + len(framed)))
                chunks.append(framed)
                start += len(framed)
            _write_all(fd, b"".join(chunks))
            os.fsync(fd)
        finally:
            os.close(fd)
        for span in spans:
            self._note(*span)
        self._size = start
        return True

    def _compact(self, new: list[tuple[event_pb2.Event, tuple[str, ...], bytes]]) -> None:
        old = self.path
        held = b""
        if old is not None:
            with open(old, "rb") as f:
                held = f.read(self._size)
        items = [(e.step, e.tags, held[e.start : e.end]) for e in self._entries]
        items += [(event.step, tags, frame(payload)) for event, tags, payload in new]
        items.sort(key=lambda item: item[0])  # stable: equal steps keep their order
        wall_time = self._start_wall_time
        if wall_time is None:
            wall_time = min([time.time(), *(event.wall_time for event, _, _ in new if event.wall_time)])
        header = frame(event_pb2.Event(wall_time=wall_time, file_version=FILE_VERSION).SerializeToString())
        # A live Python loader (--load_fast=false, --logdir_spec) reads this file after the one it is
        # on and keeps what it read there; a session start makes it drop its points at or above this
        # step first. Fresh readers meet it first, with nothing to drop.
        start = event_pb2.Event(wall_time=wall_time, step=items[0][0] if items else 0,
                                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
        header += frame(start.SerializeToString())
        generation = (self._generation or 0) + 1
        target = self.run_dir / generation_name(generation)
        tmp = self.run_dir / f"{TMP_PREFIX}{os.getpid()}-{generation}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, header + b"".join(framed for _, _, framed in items))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
        _fsync_dir(self.run_dir)
        if old is not None:
            _retire(old)
        self._forget(generation)
        self._start_wall_time = wall_time
        position = len(header)
        for step, tags, framed in items:
            self._note(step, tags, position, position + len(framed))
            position += len(framed)
        self._size = position
        self.compactions += old is not None


def _retire(path: pathlib.Path) -> bool:
    """Empties a replaced generation; removes it once it has been empty for a while. True if changed.

    Emptied, not removed at once: TensorBoard's Python directory watcher reads a file by name and
    stops for good when the file it is on disappears, but moves on to the next file after an empty
    one. Its reload interval is seconds; an emptied file is removed `EMPTY_KEEP_S` later.
    """
    status = path.stat()
    if status.st_size:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    if time.time() - status.st_mtime > EMPTY_KEEP_S:
        path.unlink()
        return True
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
