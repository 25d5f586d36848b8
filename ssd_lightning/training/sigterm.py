"""One agreed stop for a SIGTERM under DDP, and no blocking host read per training step to agree on it.

Lightning 2.6 handles SIGTERM per rank: its handler sets the rank's own ``received_sigterm`` flag (and, in
the handler, broadcasts from rank 0 outside any agreed point), the training epoch loop agrees on rank 0's flag
before every DDP batch with a blocking host read (``_TrainingEpochLoop._broadcast_sigterm_tensor``: a
host-to-device copy, a broadcast and ``.item()``), and its fit, epoch and evaluation loops also stop on the
rank's own flag. A rank whose forwarded SIGTERM lands a moment later than another's can thus stop at another
point, and on a GPU the host waits for the whole queued step before every batch (docs/ARCHITECTURE.md,
trap 40).

Here, while a trainer with more than one process fits:

* :class:`AgreedSigtermConnector` only records the signal on the rank
  (:attr:`~AgreedSigtermConnector.requested`) and forwards it to the processes Lightning started; Lightning's
  own flag stays down, so none of its per-rank checks can fire on one rank alone;
* :class:`AgreedSigtermEpochLoop` reduces every rank's request (the maximum: a signal to any rank stops all)
  on the device before each training batch, copies the result to the host asynchronously and reads it before
  the next batch. Every rank reads the same reduction before the same batch; when it says stop, every rank
  raises Lightning's flag and ``SIGTERMException`` there, and the preemption checkpoint follows.

The stop comes one training batch later than Lightning's (a SIGTERM during a validation inside ``fit`` is
acted on at the second training batch after it). A single process, and evaluation, predict and test runs keep
Lightning's behaviour, less the broadcast inside the handler.
"""

from __future__ import annotations

import contextlib
import logging
from types import FrameType

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssd_lightning.training.fastpath import HostCopy

log = logging.getLogger("ssd_lightning")


class AgreedSigtermConnector(_SignalConnector):
    """Lightning's signal connector whose SIGTERM, while a multi-process trainer fits, waits for the ranks'
    agreement (:class:`AgreedSigtermEpochLoop`) instead of raising the rank's own flag."""

    def __init__(self, trainer: pl.Trainer) -> None:
        super().__init__(trainer)
        #: a SIGTERM reached this process (in any stage; cleared when the trainer installs its handlers)
        self.requested = False

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()
        self.requested = False

    def _sigterm_notifier_fn(self, signum: int, _: FrameType | None) -> None:
        log.info("rank %d received SIGTERM (%d)", self.trainer.global_rank, signum)
        if not (self.requested or self.received_sigterm):
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)  # as Lightning: the ranks it started get the signal too
        self.requested = True
        if not self.waits_for_agreement():
            self.received_sigterm = True

    def waits_for_agreement(self) -> bool:
        """Whether a SIGTERM now is left to the ranks' agreement: the trainer fits with several processes."""
        trainer = self.trainer
        return trainer.state.fn == TrainerFn.FITTING and trainer.num_nodes * trainer.num_devices > 1


class AgreedSigtermEpochLoop(_TrainingEpochLoop):
    """``_TrainingEpochLoop`` whose per-batch DDP SIGTERM agreement makes no blocking host read: before batch
    k+1 it reads the maximum over the ranks of their requests reduced before batch k (see the module
    docstring). Everything else is Lightning's loop."""

    def __init__(self, trainer: pl.Trainer, min_steps: int | None = None, max_steps: int = -1) -> None:
        super().__init__(trainer, min_steps=min_steps, max_steps=max_steps)
        self._flag: torch.Tensor | None = None  # shape [1], int32, on the strategy's root device
        self._reduced: HostCopy | None = None  # the reduction made before the previous batch

    def _broadcast_sigterm_tensor(self) -> None:
        reduced, self._reduced = self._reduced, None
        if reduced is not None and reduced.tolist()[0] > 0:
            self.trainer._signal_connector.received_sigterm = True  # Lightning's later checks agree
            with contextlib.suppress(Exception):
                dist.barrier()  # as Lightning: every rank reaches the exit before any leaves
            raise SIGTERMException()
        device = self.trainer.strategy.root_device
        if self._flag is None or self._flag.device != device:
            self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        requested = self.trainer._signal_connector.requested  # use_agreed_sigterm installs both
        self._flag.fill_(1 if requested else 0)  # a kernel, not a host-to-device copy
        try:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        except Exception:  # as Lightning: a failed collective counts as no SIGTERM
            return
        self._reduced = HostCopy(self._flag)


def use_agreed_sigterm(trainer: pl.Trainer) -> None:
    """Give a freshly built trainer :class:`AgreedSigtermConnector` and :class:`AgreedSigtermEpochLoop` (same
    step limits), assigned where ``Trainer.__init__`` assigns Lightning's own."""
    for name in ("_signal_connector", "fit_loop"):
        if not hasattr(trainer, name):  # pytorch-lightning is pinned; a rename must not pass silently
            raise RuntimeError(f"pytorch_lightning.Trainer has no {name}: the SIGTERM agreement needs 2.6.x")
    trainer._signal_connector = AgreedSigtermConnector(trainer)
    old = trainer.fit_loop.epoch_loop
    loop = AgreedSigtermEpochLoop(trainer, min_steps=old.min_steps, max_steps=old.max_steps)
    trainer.fit_loop.epoch_loop = loop
