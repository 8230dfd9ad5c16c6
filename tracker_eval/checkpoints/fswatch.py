"""Wakes the watcher early when a checkpoint directory changes (inotify), else waits a poll interval.

    with DirectoryEvents("/ckpts") as events:
        events.wait(timeout=5.0)   # True when something was created or renamed in, else False

Orbax finalizes a local checkpoint by renaming `<step>.orbax-checkpoint-tmp` to `<step>`, which
inotify reports as IN_MOVED_TO on the root. Polling stays the source of truth: events only cut
the wait short, so a missed or unsupported event costs at most one poll interval.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import time

LOG = logging.getLogger(__name__)

_IN_CREATE = 0x00000100
_IN_MOVED_TO = 0x00000080
_IN_CLOSE_WRITE = 0x00000008
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000


def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return lib
    except (OSError, AttributeError):
        return None


class DirectoryEvents:
    """Event-driven fast path over a local directory, with a plain sleep as fallback.

    Args:
      path: the checkpoint directory (may not exist yet: the watch is added once it does).
      enabled: False forces the polling fallback (config `watch.fast_path`).
    """

    def __init__(self, path: str | os.PathLike[str], *, enabled: bool = True) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._watching = False
        self._lib = _libc() if enabled and "://" not in self.path else None
        if self._lib is not None:
            fd = self._lib.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                LOG.debug("inotify unavailable (errno %d); polling only", ctypes.get_errno())
                self._lib = None
            else:
                self._fd = fd
        self._ensure_watch()

    @property
    def active(self) -> bool:
        """True when filesystem events cut waits short."""
        return self._watching

    def wait(self, timeout: float) -> bool:
        """Blocks until an event arrives or `timeout` seconds pass; True on an event."""
        self._ensure_watch()
        if not self._watching or self._fd is None:
            time.sleep(max(0.0, timeout))
            return False
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        self._drain()
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._watching = False

    def __enter__(self) -> DirectoryEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_watch(self) -> None:
        if self._watching or self._lib is None or self._fd is None or not os.path.isdir(self.path):
            return
        mask = _IN_CREATE | _IN_MOVED_TO | _IN_CLOSE_WRITE | _IN_DELETE_SELF | _IN_MOVE_SELF
        wd = self._lib.inotify_add_watch(self._fd, os.fsencode(self.path), mask)
        if wd < 0:
            LOG.debug("inotify_add_watch(%s) failed: %s", self.path, os.strerror(ctypes.get_errno()))
            return
        self._watching = True

    def _drain(self) -> None:
        assert self._fd is not None
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return
                raise
            if not data:
                return
            # The directory itself was removed or moved: re-add the watch when it is back.
            if _self_gone(data):
                self._watching = False


def _self_gone(data: bytes) -> bool:
    offset = 0
    while offset + 16 <= len(data):
        mask = int.from_bytes(data[offset + 4 : offset + 8], "little")
        length = int.from_bytes(data[offset + 12 : offset + 16], "little")
        if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | 0x00008000):  # IN_IGNORED
            return True
        offset += 16 + length
    return False
