"""Checkpoint files that take no more disk than they must, and a warning when the run directory is too small.

* :class:`BestCheckpoint`: ``best.ckpt`` (best ``val/AP``) as a hard link to ``last.ckpt`` when both hold the
  same weights, i.e. when the best validation is the one right after the epoch ``last.ckpt`` was written
  (the usual case while a run still improves). The two names then share one file on disk; when ``last.ckpt``
  is next replaced (atomically: a new file renamed over it), ``best.ckpt`` keeps the old one. Otherwise, or on
  a file system without hard links, it is a full copy as Lightning writes it. Resuming always uses
  ``last.ckpt``; ``best.ckpt`` is for evaluation (a linked one resumes just before that validation).
* :class:`CheckpointSpaceCheck`: at the start of training, rank 0 compares the room the checkpoints need
  (every checkpoint file, plus one temporary copy while a file is replaced) with the free space of their
  folder, and logs one warning when it is short, before the first epoch rather than after an hour.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ssd_lightning.checkpoints.io import tensor_bytes
from ssd_lightning.fileio import format_bytes, free_bytes, fsync_dir, temporary_path

__all__ = ["BestCheckpoint", "CheckpointSpaceCheck", "estimated_checkpoint_bytes"]

log = logging.getLogger("ssd_lightning")


def _last_checkpoint(trainer: pl.Trainer, exclude: ModelCheckpoint) -> ModelCheckpoint | None:
    """The run's ``last.ckpt`` writer: a ModelCheckpoint without a monitor, other than ``exclude``."""
    for callback in trainer.checkpoint_callbacks:
        if callback is not exclude and isinstance(callback, ModelCheckpoint) and callback.monitor is None:
            return callback
    return None


class BestCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` for the best model that hard-links ``last.ckpt`` when it holds the same
    weights (see the module docstring). Takes ModelCheckpoint's arguments; ``link_last=False`` turns the
    link off."""

    def __init__(self, *args: Any, link_last: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.link_last = bool(link_last)

    def _linkable_source(self, trainer: pl.Trainer) -> Path | None:
        """``last.ckpt`` when it was written at this global step (no optimizer step since), else None."""
        last = _last_checkpoint(trainer, self) if self.link_last else None
        if last is None or not last._last_checkpoint_saved:
            return None
        if (
            last._last_global_step_saved != trainer.global_step
            or self.save_weights_only != last.save_weights_only
        ):
            return None
        source = Path(last._last_checkpoint_saved)
        return source if source.is_file() else None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        source = self._linkable_source(trainer)
        linked = False
        if source is not None and trainer.is_global_zero:
            linked = _hard_link(source, Path(filepath))
        # every rank must take the same branch (Lightning's save has a barrier inside)
        linked = bool(trainer.strategy.broadcast(linked, src=0)) if source is not None else False
        if not linked:
            super()._save_checkpoint(trainer, filepath)
            return
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            log.info("%s: the same weights as %s (hard link, no second copy)", filepath, source.name)
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


def _hard_link(source: Path, target: Path) -> bool:
    """Make ``target`` a hard link to ``source`` atomically (a temporary link renamed over ``target``);
    False where the file system has no hard links."""
    tmp = temporary_path(target)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    fsync_dir(target.parent)
    return True


def estimated_checkpoint_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """About the size of one checkpoint file: the module's state dict plus the optimizer state (what is
    there, else one buffer per parameter for SGD with momentum, two for Adam-like optimizers)."""
    total = tensor_bytes(module.state_dict())
    for optimizer in optimizers:
        state = tensor_bytes(list(optimizer.state.values()))
        if state == 0:
            params = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
            buffers = 2 if "betas" in optimizer.defaults else int(bool(optimizer.defaults.get("momentum")))
            state = buffers * params
        total += state
    return total


class CheckpointSpaceCheck(pl.Callback):
    """Warn at the start of training (rank 0) when the checkpoint folder has less free space than the run's
    checkpoints need: every checkpoint file plus one temporary copy while a file is replaced."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        targets = _checkpoint_files(trainer)
        if not targets:
            return
        size = estimated_checkpoint_bytes(pl_module, list(trainer.optimizers))
        folder = targets[0].parent
        free = free_bytes(folder)
        if free is None:
            return
        existing = sum(p.stat().st_size for p in targets if p.is_file())  # replaced, so their room comes back
        needed = (len(targets) + 1) * size
        names = ", ".join(p.name for p in targets)
        if free + existing < needed:
            log.warning(
                "the checkpoint folder %s has %s free but the checkpoints need about %s (%s and one "
                "temporary copy while writing, %s each): free some space or point hydra.run.dir elsewhere "
                "before a checkpoint write fails",
                folder,
                format_bytes(free + existing),
                format_bytes(needed),
                names,
                format_bytes(size),
            )
        else:
            log.info(
                "checkpoints: about %s each (%s); %s free in %s",
                format_bytes(size),
                names,
                format_bytes(free + existing),
                folder,
            )


def _checkpoint_files(trainer: pl.Trainer) -> list[Path]:
    """The fixed files the run's ModelCheckpoint callbacks write (``<dirpath>/<filename>.ckpt``)."""
    files = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and callback.filename:
            files.append(Path(callback.dirpath) / f"{callback.filename}{callback.FILE_EXTENSION}")
    return files
