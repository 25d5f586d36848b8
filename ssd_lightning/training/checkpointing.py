"""Checkpoint files that take no more disk than they must, and a warning when the run directory is too small.

* :class:`LinkedCheckpoint` (``last.ckpt`` and ``best.ckpt``): both are written at the end of a training
  epoch, ``best.ckpt`` first (after the epoch's validation has given its ``val/AP``), ``last.ckpt`` next. When
  the second file of an epoch end would hold exactly what the first holds (the same step of the same epoch
  end), it is a hard link to the first instead of a second full copy. When one of them is next replaced
  (atomically: a new file renamed over it) the other keeps the old file. Without a new best the two are
  separate files, as they must be; on a file system without hard links it is a full copy, as before.
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

__all__ = ["CheckpointSpaceCheck", "LinkedCheckpoint", "estimated_checkpoint_bytes"]

log = logging.getLogger("ssd_lightning")


def _same_moment(callback: ModelCheckpoint) -> bool:
    """Whether ``callback`` saves only at training-epoch ends (then two such saves at one global step hold
    the same trainer state)."""
    return (
        callback._save_on_train_epoch_end is True
        and not callback._every_n_train_steps
        and callback._train_time_interval is None
    )


class LinkedCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` that hard-links the file another LinkedCheckpoint wrote at the same epoch end
    (see the module docstring). Takes ModelCheckpoint's arguments; saves at training-epoch ends
    (``save_on_train_epoch_end`` is forced on); ``link=False`` turns the linking off."""

    def __init__(self, *args: Any, link: bool = True, **kwargs: Any) -> None:
        kwargs["save_on_train_epoch_end"] = True
        super().__init__(*args, **kwargs)
        self.link = bool(link)

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written before this class existed restore its best score
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__) :]

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # before the first validation there is no val/AP yet: nothing to compare, nothing to say
        if self.monitor is not None and self.monitor not in monitor_candidates:
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _peer_file(self, trainer: pl.Trainer) -> Path | None:
        """The file another LinkedCheckpoint wrote at this epoch end (this global step), else None."""
        if not self.link:
            return None
        for peer in trainer.checkpoint_callbacks:
            if (
                peer is not self
                and isinstance(peer, LinkedCheckpoint)
                and _same_moment(peer)
                and peer._last_global_step_saved == trainer.global_step
                and peer.save_weights_only == self.save_weights_only
                and peer._last_checkpoint_saved
                and Path(peer._last_checkpoint_saved).is_file()
            ):
                return Path(peer._last_checkpoint_saved)
        return None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        source = self._peer_file(trainer)
        linked = False
        if source is not None and trainer.is_global_zero:
            linked = source != Path(filepath) and _hard_link(source, Path(filepath))
        # every rank must take the same branch (Lightning's save has a barrier inside)
        linked = bool(trainer.strategy.broadcast(linked, src=0)) if source is not None else False
        if not linked:
            super()._save_checkpoint(trainer, filepath)
            return
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            log.info("%s: the same state as %s (hard link, no second copy)", filepath, source.name)
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
