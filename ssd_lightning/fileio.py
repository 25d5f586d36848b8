"""One atomic file writer for every file the project writes (checkpoints, JSON, annotation copies, pictures).

A file is either the old one or the complete new one, whatever happens during the write (``kill -9``, a full
disk, an exception while serialising): the bytes go to a temporary file in the same folder, are flushed and
fsynced, and the temporary file is renamed over the target with ``os.replace`` (atomic on POSIX file systems),
then the folder is fsynced so that the rename survives a power loss. On failure the temporary file is removed
and the error propagates. This module imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "fsync_dir", "temporary_path", "write_json_atomic"]


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_path(path: Path, unique: bool = True) -> Path:
    """The temporary file :func:`atomic_write` writes before the rename.

    ``unique``: a hidden name per process and call (several processes may write the same target, e.g. ranks
    sharing a cache folder); else ``<path>.tmp`` (one writer per file, e.g. a checkpoint: what a kill leaves
    behind is overwritten by the next save instead of piling up).
    """
    if unique:
        return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, unique: bool = True, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it replaces ``path`` (see the module docstring).

    Missing parent folders are created. ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding`` defaults to
    UTF-8). Example::

        with atomic_write(out / "metrics.json", "w") as f:
            json.dump(metrics, f)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, unique)
    text = mode == "w"
    try:
        with open(tmp, mode, encoding=(encoding or "utf-8") if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, indent: int | None = None, compact: bool = False
) -> Path:
    """Write ``obj`` as JSON to ``path`` with :func:`atomic_write`; returns ``path`` as a ``Path``.

    ``compact``: no spaces after separators (large files such as annotation copies). An object JSON cannot
    encode leaves ``path`` as it was (the error propagates).
    """
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent, separators=(",", ":") if compact else None)
    return Path(path)
