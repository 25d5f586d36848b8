"""One atomic file writer for every file the project writes (checkpoints, JSON, annotation copies, pictures).

A file is either the old one or the complete new one, whatever happens during the write (``kill -9``, a full
disk, an exception while serialising): the bytes go to a temporary file in the same folder, are flushed and
fsynced, and the temporary file is renamed over the target with ``os.replace`` (atomic on POSIX file systems),
then the folder is fsynced so that the rename survives a power loss. On failure the temporary file is removed;
an operating-system failure (a full disk, no permission, a read-only file system, a quota) becomes one
:class:`~ssd_lightning.errors.WriteError` line naming the file, the sizes and the intact previous file, other
errors propagate as they are. This module imports only :mod:`ssd_lightning.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ssd_lightning.errors import WriteError

__all__ = [
    "atomic_path",
    "atomic_write",
    "format_bytes",
    "free_bytes",
    "fsync_dir",
    "temporary_path",
    "write_error",
    "write_json_atomic",
]

# the errors a full or closed disk shows, with the words the one-line message uses
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
}
# torch.save's C++ writer reports a failed write as a RuntimeError with one of these
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_path(path: Path, unique: bool = True) -> Path:
    """The temporary file written before the rename, in ``path``'s folder.

    ``unique``: a hidden name per process and call that keeps ``path``'s suffix (several processes may write
    the same target, e.g. ranks sharing a cache folder; some writers check the suffix, e.g. torch.export's
    ``.pt2``); else ``<path>.tmp`` (one writer per file, e.g. a checkpoint: what a kill leaves behind is
    overwritten by the next save instead of piling up).
    """
    if unique:
        return path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    return path.with_name(path.name + ".tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def format_bytes(n: float) -> str:
    """``n`` bytes as ``12.3 MB`` (decimal units, as ``df -H``)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes for an unprivileged writer on the file system of ``path`` (its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _os_errno(err: BaseException) -> int | None:
    """The errno of ``err`` or of the OSError it was raised from or during (torch wraps them)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
            return err.errno
        err = err.__cause__ or err.__context__
    return None


def write_error(
    err: BaseException, path: Path, had_previous: bool, needed: int | None = None, what: str = "file"
) -> WriteError | None:
    """The one-line :class:`WriteError` for ``err`` raised while writing ``path``, or None when ``err`` is not
    a failure of the disk (then it is a bug, or a serialisation error, and keeps its traceback).

    ``needed``: the bytes the file needs, when the writer knows (shown for a full disk); ``what``: the kind of
    file (``checkpoint``) for the message.
    """
    code = _os_errno(err)
    free = free_bytes(path.parent)
    if code is None and any(s in str(err) for s in _TORCH_WRITE_FAILURES):
        # torch.save lost the OSError: a full disk is what leaves a stream at an unexpected position
        code = errno.ENOSPC if needed is None or free is None or free < needed else None
    if code is None:
        return None
    reason = _WRITE_ERRNOS[code]
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        sizes = [f"{format_bytes(needed)} needed" if needed is not None else None]
        sizes.append(f"{format_bytes(free)} free" if free is not None else None)
        shown = ", ".join(s for s in sizes if s)
        reason += f" while writing {path}" + (f" ({shown})" if shown else "")
    else:
        reason += f" while writing {path}"
    previous = f"the previous {what} {path} is intact" if had_previous else f"no {what} was written"
    return WriteError(code, f"{reason}; {previous}")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, unique: bool = True, needed: int | None = None, what: str = "file"
) -> Iterator[Path]:
    """A temporary path for writers that take a file name (model exporters, image writers); on a clean exit
    the file written there is fsynced and renamed over ``path`` (see the module docstring). Example::

        with atomic_path(out / "model.onnx") as tmp:
            torch.onnx.export(model, example, tmp)
            check(tmp)  # an exception here leaves out/model.onnx as it was

    ``needed`` (bytes) and ``what`` (``checkpoint``...) only shape the message of a failed write.

    Raises:
        WriteError: the operating system refused the write (see :func:`write_error`).
    """
    path = Path(path)
    had_previous = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path, unique)
    except OSError as err:
        raise write_error(err, path, had_previous, needed, what) or err from err
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        failure = write_error(err, path, had_previous, needed, what) if isinstance(err, Exception) else None
        if failure is None:
            raise
        raise failure from err
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    unique: bool = True,
    encoding: str | None = None,
    needed: int | None = None,
    what: str = "file",
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it replaces ``path`` (see the module docstring).

    Missing parent folders are created. ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding`` defaults to
    UTF-8); ``needed`` and ``what`` as for :func:`atomic_path`. Example::

        with atomic_write(out / "metrics.json", "w") as f:
            json.dump(metrics, f)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    text_encoding = (encoding or "utf-8") if mode == "w" else None
    with (
        atomic_path(path, unique=unique, needed=needed, what=what) as tmp,
        open(tmp, mode, encoding=text_encoding) as f,
    ):
        yield f


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
