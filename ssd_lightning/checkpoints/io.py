"""Checkpoint files on disk: the atomic writer Lightning saves through, and ``ckpt_path=last``.

* :class:`AtomicCheckpointIO` (``trainer.plugins``): every checkpoint file is complete or absent. It is
  written to ``<path>.tmp``, flushed to disk (fsync) and renamed over ``<path>`` (``os.replace``, atomic on
  POSIX file systems), so a process killed at any moment (``kill -9``, out of memory, node failure) leaves the
  previous ``last.ckpt`` intact; a ``.tmp`` left behind by a kill is overwritten by the next save.
* :func:`resolve_ckpt_path`: ``ckpt_path=last`` is this run directory's ``checkpoints/last.ckpt`` (or the
  newest SLURM ``hpc_ckpt_*.ckpt`` there) if it has one, else the most recent ``checkpoints/last.ckpt`` under
  ``<paths.log_dir>/<task_name>/runs/``; with none, training starts from scratch (as Lightning's ``"last"``:
  a job script can always pass it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ssd_lightning.errors import ConfigError
from ssd_lightning.fileio import atomic_write
from ssd_lightning.rundirs import find_last_checkpoint

__all__ = ["AtomicCheckpointIO", "find_last_checkpoint", "resolve_ckpt_path"]

log = logging.getLogger("ssd_lightning")

# rank 0's resolution of ckpt_path=last, inherited by the DDP ranks Lightning starts (same file everywhere)
_LAST_ENV = "SSD_LIGHTNING_RESUME_LAST"


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about its size on disk (the rest is small)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose checkpoint files are always complete.

    ``save_checkpoint`` writes through :func:`ssd_lightning.fileio.atomic_write` (``<path>.tmp``, fsync,
    ``os.replace``, fsync of the folder). Killed before the rename, ``<path>`` is the previous complete
    checkpoint; after it, the new one. A failed write removes the ``.tmp`` and raises; a full disk (or
    another refusal of the operating system) is one :class:`~ssd_lightning.errors.WriteError` line: ``no space
    left on device while writing <path> (<size> needed, <free> free); the previous checkpoint <path> is
    intact``. Remote paths (``s3://`` ...) go through Lightning's own writer.

    Lightning's default writer is not enough: it writes to a temporary file in the system temp folder and
    moves it, which is a copy (not atomic) when that folder is on another file system, and it never fsyncs.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path, "wb", unique=False, needed=tensor_bytes(checkpoint), what="checkpoint") as f:
            self._write(checkpoint, f)

    def _write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        """Serialise ``checkpoint`` into the open temporary file (the seam the kill tests slow down)."""
        torch.save(checkpoint, f)


def resolve_ckpt_path(cfg: Any, multirun: bool = False) -> str | None:
    """``cfg.ckpt_path`` with ``last`` resolved to a file (logged), or None (start from scratch).

    ``multirun``: a sweep job resumes from its own directory only.
    """
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and str(ckpt_path) != "last" and Path(str(ckpt_path)).is_dir():
        folder = Path(str(ckpt_path))
        inside = [p for p in (folder / "checkpoints" / "last.ckpt", folder / "last.ckpt") if p.is_file()]
        hint = f"ckpt_path={inside[0]}" if inside else "ckpt_path=<run dir>/checkpoints/last.ckpt"
        raise ConfigError(f"ckpt_path={folder} is a folder, not a checkpoint file: pass {hint}")
    if ckpt_path is None or str(ckpt_path) != "last":
        return None if ckpt_path in (None, "") else str(ckpt_path)
    inherited = os.environ.get(_LAST_ENV)
    if inherited is not None and os.environ.get("LOCAL_RANK", "0") != "0":
        return inherited or None  # a DDP rank Lightning started from rank 0: rank 0's file (or none)
    runs_dir = None
    if not multirun:  # a sweep job resumes its own directory only
        runs_dir = Path(cfg.paths.log_dir) / str(cfg.get("task_name", "train")) / "runs"
    found = find_last_checkpoint(cfg.paths.output_dir, runs_dir)
    if found is None:
        where = f"{cfg.paths.output_dir}/checkpoints" + (f" or {runs_dir}/*/checkpoints" if runs_dir else "")
        log.warning("ckpt_path=last: no last.ckpt in %s: training starts from scratch", where)
        os.environ[_LAST_ENV] = ""
        return None
    log.info("ckpt_path=last: resuming from %s", found)
    os.environ[_LAST_ENV] = str(found)
    return str(found)
