""".npz files of named arrays that any name round-trips through, written atomically.

The one writer of per-example arrays: the ledger's stored results, the JSONL logger's files and
the MLflow artifacts all go through it. ``np.savez(file, **arrays)`` cannot take an array named
``file`` or ``allow_pickle`` (they are its own arguments), and ``np.load`` confuses an array named
``x`` with one named ``x.npy``; here the zip is written and read entry by entry, so every name
comes back as it went in.

    write_npz(path, {"file": np.arange(3), "allow_pickle": np.ones(2)})
    read_npz(path)   # {"file": array([0, 1, 2]), "allow_pickle": array([1., 1.])}
    read_npz(npz_bytes({"loss": np.ones(2)}))   # the same archive in memory (a PostgreSQL ledger stores it)
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import numpy as np

_SUFFIX = ".npy"
_EPOCH = (1980, 1, 1, 0, 0, 0)
"""Every entry's zip time stamp: equal arrays give equal bytes (a copied ledger compares stored archives)."""


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], *, durable: bool = True) -> Path:
    """Writes `arrays` to `path` all at once: a reader sees the old file, the new one or none.

    Args:
      path: the file to (re)place; its directory is created if missing.
      arrays: arrays by name (any string); insertion order is kept in the file.
      durable: fsync the file and the directory, so a power cut cannot lose the rename.

    Returns:
      The path written.

    Raises:
      ValueError: an array has dtype object, which `.npz` can only hold by pickling.
    """
    target = Path(path)
    _check(arrays)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    try:
        with open(temp, "wb") as handle:
            _write_archive(handle, arrays)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(target.parent)
    return target


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The `.npz` archive `write_npz` would write, in memory; equal arrays give equal bytes.

    Raises:
      ValueError: an array has dtype object.
    """
    _check(arrays)
    buffer = io.BytesIO()
    _write_archive(buffer, arrays)
    return buffer.getvalue()


def read_npz(source: str | os.PathLike[str] | bytes) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file (or of its bytes), by the name it was written under, in file order.

    Reads archives of `write_npz`, `npz_bytes` and ``np.savez`` alike; pickled (object) arrays are refused.
    """
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
        for entry in archive.namelist():
            if not entry.endswith(_SUFFIX):
                continue
            with archive.open(entry) as handle:
                arrays[entry[: -len(_SUFFIX)]] = np.lib.format.read_array(handle, allow_pickle=False)
    return arrays


def _check(arrays: Mapping[str, np.ndarray]) -> None:
    for name, value in arrays.items():
        if np.asarray(value).dtype.hasobject:
            raise ValueError(
                f"per-example array {name!r} has dtype object; store numbers or fixed-width strings "
                "(e.g. np.asarray(values, dtype=str))"
            )


def _write_archive(handle: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}{_SUFFIX}", date_time=_EPOCH), "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asarray(value), allow_pickle=False)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; without it a power cut may forget the new name.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
