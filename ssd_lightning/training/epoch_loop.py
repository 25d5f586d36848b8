"""Lightning's training epoch loop without its one blocking host read per DDP step.

Lightning 2.6 makes the DDP ranks agree on a SIGTERM before every training batch
(``_TrainingEpochLoop._broadcast_sigterm_tensor``): rank 0's "SIGTERM received" flag is put on the device
with a blocking host-to-device copy, broadcast, and read back with ``.item()``. On a GPU that drains the
device's queue once per step. :class:`LaggedSigtermEpochLoop` broadcasts the same flag from a persistent
device tensor and reads it one batch later from an asynchronous host copy, so the host never waits for the
device; every rank reads the same broadcast before the same batch, so the ranks still stop together (one
batch later than Lightning's).
"""

from __future__ import annotations

import contextlib

import pytorch_lightning as pl
import torch
from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssd_lightning.training.fastpath import HostCopy


class LaggedSigtermEpochLoop(_TrainingEpochLoop):
    """``_TrainingEpochLoop`` whose SIGTERM agreement reads, before batch k+1, the flag broadcast before batch
    k (see the module docstring). Everything else is Lightning's loop."""

    def __init__(self, trainer: pl.Trainer, min_steps: int | None = None, max_steps: int = -1) -> None:
        super().__init__(trainer, min_steps=min_steps, max_steps=max_steps)
        self._sigterm_flag: torch.Tensor | None = None  # shape [1], int32, on the strategy's root device
        self._sigterm_pending: HostCopy | None = None  # the flag broadcast before the previous batch

    def _broadcast_sigterm_tensor(self) -> None:
        pending, self._sigterm_pending = self._sigterm_pending, None
        if pending is not None and pending.tolist()[0] == 1:
            with contextlib.suppress(Exception):
                torch.distributed.barrier()  # as Lightning: every rank reaches the exit before any leaves
            raise SIGTERMException()
        device = self.trainer.strategy.root_device
        if self._sigterm_flag is None or self._sigterm_flag.device != device:
            self._sigterm_flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._sigterm_flag.fill_(1 if self.trainer.received_sigterm else 0)  # a kernel, not a copy
        try:
            torch.distributed.broadcast(self._sigterm_flag, src=0)
        except Exception:  # as Lightning: a failed broadcast counts as no SIGTERM
            return
        self._sigterm_pending = HostCopy(self._sigterm_flag)


def use_lagged_sigterm_loop(trainer: pl.Trainer) -> None:
    """Replace ``trainer.fit_loop.epoch_loop`` (Lightning's, just built by ``Trainer.__init__``) with a
    :class:`LaggedSigtermEpochLoop` of the same step limits, as ``Trainer.__init__`` itself assigns it."""
    old = trainer.fit_loop.epoch_loop
    loop = LaggedSigtermEpochLoop(trainer, min_steps=old.min_steps, max_steps=old.max_steps)
    trainer.fit_loop.epoch_loop = loop
