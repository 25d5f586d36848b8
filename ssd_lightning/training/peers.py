"""A DDP rank that dies: the survivors stop with one line naming the lost rank and the resume command.

When a rank is killed (``kill -9``, out of memory, a lost node), the others fail inside the next collective:
with gloo within seconds ("Connection closed by peer"), with NCCL at the latest after the process group's
timeout (``trainer.strategy.timeout``, 30 minutes by default). :class:`PeerLossReport` recognises that error
in Lightning's ``on_exception`` hook, before Lightning kills the ranks it started, and works out which rank is
gone: the launching process (global rank 0 on a node) sees which of its child processes has ended and how; a
rank it started sees when the launching process itself is gone. The task then raises
:class:`~ssd_lightning.errors.PeerLostError`, one ``error:`` line with exit code 1.

Lightning's launcher also watches its children from a thread (every 5 s) and, when one has died, SIGKILLs
every process, itself included: whichever notices first would decide whether the user sees our line and exit
code 1, or Lightning's log line and exit code -9. :func:`install_peer_loss_observer` replaces that watcher by
one that prints the same ``error:`` line and exits with code 1 (after killing the other children, as
Lightning's does) when it is first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
import pytorch_lightning as pl
import pytorch_lightning.strategies.launchers.subprocess_script as pl_launcher
import torch

from ssd_lightning.errors import PeerLostError

__all__ = ["PeerLossReport", "install_peer_loss_observer", "is_peer_loss", "lost_ranks", "peer_loss_error"]

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
    """``killed by SIGKILL`` for a negative return code (Popen's signal convention), else the exit code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def lost_ranks(trainer: pl.Trainer, wait_s: float = 2.0) -> list[str]:
    """The ranks this process can tell are gone, e.g. ``["rank 1 (killed by SIGKILL)"]`` (empty: unknown).

    A rank killed with SIGKILL closes its sockets before it can be reaped, so the failed collective may be
    seen first: the ranks this process started are polled for up to ``wait_s`` seconds until one has ended."""
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    first = trainer.node_rank * trainer.num_devices
    deadline = time.monotonic() + wait_s
    while True:
        lost = [
            f"rank {first + local} ({_exit_text(code)})"
            for local, proc in enumerate(procs, start=1)
            if (code := proc.poll()) is not None
        ]
        if lost or not procs or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not procs and trainer.local_rank != 0 and os.getppid() != _PARENT_PID:
        lost.append(f"rank {first} (the process that started this one is gone)")
    return lost


class PeerLossReport(pl.Callback):
    """Turn a collective that failed because a rank died into one :class:`PeerLostError` (see the module
    docstring); ``error`` holds it after Lightning's ``on_exception`` and the task raises it."""

    def __init__(self) -> None:
        self.error: PeerLostError | None = None
        self._trainer: pl.Trainer | None = None
        self._lock = threading.Lock()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        global _ACTIVE
        self._trainer, _ACTIVE = trainer, self

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.world_size >= 2 and is_peer_loss(exception):
            self.record(trainer)

    def record(self, trainer: pl.Trainer) -> bool:
        """Describe the lost rank once (from whichever thread notices first); True for the first caller."""
        with self._lock:
            if self.error is not None:
                return False
            lost = ", ".join(lost_ranks(trainer)) or "another rank"
            self.error = PeerLostError(
                f"rank {trainer.global_rank} of {trainer.world_size} lost {lost} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; the run cannot go on without it: "
                f"{_resume_hint(trainer)}"
            )
            return True


# the report of the fit running in this process (the observer thread has no other way to the trainer)
_ACTIVE: PeerLossReport | None = None


class _ReportingObserver(fabric_launcher._ChildProcessObserver):
    """Lightning's child-process watcher (a private class of lightning_fabric 2.6), ending with our line."""

    def _terminate_all(self) -> None:
        report = _ACTIVE
        if report is None or report._trainer is None:
            super()._terminate_all()  # not training: Lightning's behaviour
            return
        first = report.record(report._trainer)
        for proc in self._child_processes:
            proc.send_signal(self._termination_signal)
        if first:  # the main thread has not noticed (it may hang in a collective): report and end from here
            print(f"error: {report.error}", file=sys.stderr, flush=True)
            os._exit(1)
        # else the main thread is already on its way out with the same line and exit code 1


def _launch_observer(child_processes: list[Any]) -> None:
    _ReportingObserver(child_processes=child_processes, main_pid=os.getpid()).start()


def install_peer_loss_observer() -> None:
    """Make Lightning's launcher watch its children with :class:`_ReportingObserver` (idempotent)."""
    for module in (fabric_launcher, pl_launcher):
        module._launch_process_observer = _launch_observer


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
