"""Run directories on disk: where a run's checkpoints and Hydra config are, and the newest ``last.ckpt``.

A run directory (``hydra.run.dir``, ``outputs/train/runs/<date>_<time>``) holds ``checkpoints/last.ckpt`` and
``checkpoints/best.ckpt``, SLURM's ``hpc_ckpt_<n>.ckpt`` (Lightning's auto-requeue) and ``.hydra/`` (the
composed ``config.yaml`` and the command line's ``overrides.yaml``). Plain path logic without torch: the
scripts use it before Hydra composes the config (``train.py ckpt_path=<run>/checkpoints/last.ckpt`` resumes
that run with its own config, :mod:`ssd_lightning.runtime.resume`). It imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["find_last_checkpoint", "run_dir_of"]


def _newest(paths: Sequence[Path]) -> Path | None:
    stamped = []
    for p in paths:
        with contextlib.suppress(OSError):
            stamped.append((p.stat().st_mtime_ns, str(p), p))
    return max(stamped)[2] if stamped else None


def find_last_checkpoint(
    output_dir: str | os.PathLike | None, runs_dir: str | os.PathLike | None
) -> Path | None:
    """What ``ckpt_path=last`` resumes from: ``output_dir``'s ``checkpoints/last.ckpt`` or its newest
    ``hpc_ckpt_*.ckpt``, else the newest ``*/checkpoints/last.ckpt`` under ``runs_dir``; None when there is
    nothing."""
    if output_dir is not None:
        own = Path(output_dir)
        found = _newest(
            [p for p in [own / "checkpoints" / "last.ckpt", *own.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        )
        if found is not None:
            return found
    if runs_dir is None:
        return None
    return _newest([p for p in Path(runs_dir).glob("*/checkpoints/last.ckpt") if p.is_file()])


def run_dir_of(ckpt_path: str | os.PathLike) -> Path | None:
    """The run directory a checkpoint file belongs to (``<run>/checkpoints/*.ckpt`` or
    ``<run>/hpc_ckpt_*.ckpt``) when it has Hydra's ``.hydra/overrides.yaml``; None otherwise (a file copied
    elsewhere, a checkpoint of another tool)."""
    path = Path(ckpt_path)
    if not path.is_file():
        return None
    for folder in (path.parent, path.parent.parent):
        if (folder / ".hydra" / "overrides.yaml").is_file():
            return folder
    return None
