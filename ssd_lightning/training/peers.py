"""A DDP rank that dies: the survivors stop with one line naming the lost rank and the resume command.

When a rank is killed (``kill -9``, out of memory, a lost node), the others fail inside the next collective:
with gloo within seconds ("Connection closed by peer"), with NCCL at the latest after the process group's
timeout (``trainer.strategy.timeout``, 30 minutes by default). :class:`PeerLossReport` recognises that error
in Lightning's ``on_exception`` hook, before Lightning kills the ranks it started, and works out which rank is
gone: the launching process (global rank 0 on a node) sees which of its child processes has ended and how; a
rank it started sees when the launching process itself is gone. The task then raises
:class:`~ssd_lightning.errors.PeerLostError`, one ``error:`` line with exit code 1.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ssd_lightning.errors import PeerLostError

__all__ = ["PeerLossReport", "is_peer_loss", "lost_ranks"]

# what gloo and NCCL say when the other end of a collective has gone away
_PEER_LOSS_PHRASES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL",
    "Watchdog caught collective operation timeout",
    "Socket Timeout",
)
# the process that started this one (for a rank Lightning's launcher started: the launcher, rank 0)
_PARENT_PID = os.getppid()


def is_peer_loss(err: BaseException | None) -> bool:
    """Whether ``err`` (or what it was raised from) is a collective that failed as a peer rank is gone."""
    dist_error = getattr(torch.distributed, "DistError", ())
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, dist_error) or any(p in str(err) for p in _PEER_LOSS_PHRASES):
            return True
        err = err.__cause__ or err.__context__
    return False


def _exit_text(code: int) -> str:
    if code < 0:
        with_signal = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
        return f"killed by {with_signal}"
    return f"exited with code {code}"


def lost_ranks(trainer: pl.Trainer) -> list[str]:
    """The ranks this process can tell are gone, e.g. ``["rank 1 (killed by SIGKILL)"]`` (empty: unknown)."""
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    first = trainer.node_rank * trainer.num_devices
    lost = [
        f"rank {first + local} ({_exit_text(code)})"
        for local, proc in enumerate(procs, start=1)
        if (code := proc.poll()) is not None
    ]
    if not procs and trainer.local_rank != 0 and os.getppid() != _PARENT_PID:
        lost.append(f"rank {first} (the process that started this one is gone)")
    return lost


class PeerLossReport(pl.Callback):
    """Turn a collective that failed because a rank died into one :class:`PeerLostError` (see the module
    docstring); ``error`` holds it after Lightning's ``on_exception`` and the task raises it."""

    def __init__(self) -> None:
        self.error: PeerLostError | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.world_size < 2 or not is_peer_loss(exception):
            return
        lost = ", ".join(lost_ranks(trainer)) or "another rank"
        self.error = PeerLostError(
            f"rank {trainer.global_rank} of {trainer.world_size} lost {lost} at epoch "
            f"{trainer.current_epoch}, step {trainer.global_step}; the run cannot go on without it: "
            f"{_resume_hint(trainer)}"
        )


def _resume_hint(trainer: pl.Trainer) -> str:
    last = next(
        (
            Path(c.last_model_path or c._last_checkpoint_saved or "")
            for c in trainer.checkpoint_callbacks
            if getattr(c, "monitor", "x") is None
        ),
        None,
    )
    if last is not None and last.is_file():
        return f"resume with the same command and ckpt_path=last (the last checkpoint is {last})"
    return "start it again (no checkpoint was written yet)"


def peer_loss_error(callbacks: list[Any]) -> PeerLostError | None:
    """The error a :class:`PeerLossReport` among ``callbacks`` recorded, if any."""
    return next((c.error for c in callbacks if isinstance(c, PeerLossReport) and c.error), None)
