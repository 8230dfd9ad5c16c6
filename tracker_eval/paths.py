"""Checkpoint locations that may be local paths or URLs (gs://bucket/run), joined and made absolute safely.

    join_path("gs://b/run", "40")      # "gs://b/run/40"      (never os.path.join on a URL)
    join_path("/ckpts/run", "40")      # "/ckpts/run/40"
    absolute_path("gs://b/run")        # "gs://b/run"         (os.path.abspath would make it ./gs:/b/run)
    absolute_path("ckpts")             # "/home/me/ckpts"

`os.path.join` and `os.path.abspath` treat `gs://b/run` as a relative local path and turn it into
`<cwd>/gs:/b/run`, so every place that builds a path under `checkpoint_dir` goes through here.
"""

from __future__ import annotations

import os
import re

# RFC 3986 scheme followed by "://": gs://, s3://, file://.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a URL (``scheme://...``) rather than a local path."""
    return _URL.match(os.fspath(path)) is not None


def join_path(base: str | os.PathLike[str], *parts: str) -> str:
    """`base` with `parts` appended: `/` separators for a URL, `os.path.join` for a local path.

    Args:
        base: A local path or a URL such as ``gs://bucket/run``.
        *parts: Relative components (no leading `/`).

    Returns:
        The joined location as a string.
    """
    text = os.fspath(base)
    if not is_url(text):
        return os.path.join(text, *parts)
    return "/".join([text.rstrip("/"), *(part.strip("/") for part in parts)])


def absolute_path(path: str | os.PathLike[str]) -> str:
    """A local path made absolute; a URL unchanged (it is absolute already)."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(text)
