"""A checkpoint directory as one stable string: part of the identity of an evaluation stream.

The ledger's stream and the trackers' run (W&B run id, MLflow run tag) are keyed by it, so a
training process and a watcher started from different working directories, or on different
machines reading the same bucket, must arrive at the same string.

    normalize_checkpoint_dir("ckpts")            # "/home/me/run/ckpts", when started in /home/me/run
    normalize_checkpoint_dir("gs://b/run/")      # "gs://b/run": a URL is never treated as a local path
    join_path("gs://b/run", "40")                # "gs://b/run/40" (never os.path.join on a URL)

`os.path.join` and `os.path.abspath` treat `gs://b/run` as a relative local path and turn it into
`<cwd>/gs:/b/run`, so every place that builds a location under `checkpoint_dir` goes through here.
"""

from __future__ import annotations

import os
import re

# RFC 3986 scheme followed by "://": gs://, s3://, file://, http://.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a URL (``scheme://...``) rather than a local path."""
    return _URL.match(os.fspath(path)) is not None


def normalize_checkpoint_dir(path: str | os.PathLike[str]) -> str:
    """The canonical form of a checkpoint directory.

    A local path is made absolute (``ckpts``, ``./ckpts`` and ``/abs/ckpts`` name one directory);
    a URL keeps its path as given, with the scheme in lower case and no trailing slash, since
    ``gs://b/run`` and ``gs://b/run/`` are one prefix. Symbolic links are not resolved: the same
    volume mounted at two places cannot be told apart anyway, and resolving would rename streams
    that existing ledgers already hold.

    Args:
      path: a local path or a URL.

    Returns:
      The normalized string.
    """
    text = os.fspath(path)
    match = _URL.match(text)
    if match is None:
        return os.path.abspath(text)
    scheme, rest = match.groups()
    stripped = rest.rstrip("/")
    return f"{scheme.lower()}://{stripped or rest}"


def join_path(base: str | os.PathLike[str], *parts: str) -> str:
    """`base` with `parts` appended: `/` separators for a URL, `os.path.join` for a local path.

    Args:
      base: a local path or a URL such as ``gs://bucket/run``.
      *parts: relative components (no leading `/`).

    Returns:
      The joined location as a string.
    """
    text = os.fspath(base)
    if not is_url(text):
        return os.path.join(text, *parts)
    return "/".join([text.rstrip("/"), *(part.strip("/") for part in parts)])
