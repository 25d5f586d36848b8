"""Lightning callbacks used by the Hydra configs (``conf/callbacks/``) and by every task.

* :class:`ValidationSchedule`: validate after listed epochs (NVIDIA's evaluation epochs) and after the last;
* :class:`PreemptionCheckpoint` and :func:`exit_preempted`: SIGTERM becomes a checkpoint and exit code 143;
* :class:`NonFiniteGuard` (:mod:`.nonfinite`): skip optimizer steps with a non-finite loss or gradients on
  the device, stop after too many in a row;
* :class:`RNGState`: the random generators' states in the checkpoint (exact resume);
* :class:`ModelSummaryPrinter`: the model's size and FLOPs once at start, on rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssd_lightning.model.summary import model_summary
from ssd_lightning.training.nonfinite import NonFiniteGuard

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "ModelSummaryPrinter",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "RNGState",
    "ValidationSchedule",
    "exit_preempted",
]

log = logging.getLogger("ssd_lightning")


class ValidationSchedule(pl.Callback):
    """Validate after the listed epochs, or every ``trainer.check_val_every_n_epoch`` epochs, and always after
    the last epoch, also when a step budget (``trainer.max_steps``) ends the run inside an epoch.

    NVIDIA SSD300 v1.1 evaluates after epochs 21, 31, 37, 42, 48, 53, 59 and 64 (0-based) of 65. Lightning
    can only validate every N epochs and does not validate after the last epoch unless N divides
    ``max_epochs``; this callback decides per epoch (it sets ``trainer.check_val_every_n_epoch`` to 1 on the
    epochs that validate and to a value that skips validation on the others). Lightning does not validate
    either when ``max_steps`` stops a run mid-epoch: at that step this callback sets ``trainer.should_stop``,
    which makes Lightning validate after the step (as for early stopping); the epoch-end checkpoints follow.

    Args:
        epochs: 0-based epochs after which to validate. None: every ``trainer.check_val_every_n_epoch`` epochs
            (Lightning's rule); ``[]``: only after the last epoch (``experiment=quickstart``).
        final: also validate after the last epoch (``max_epochs - 1``, or the epoch in which the step budget
            runs out), so a run always ends with its AP.

    With ``trainer.check_val_every_n_epoch=null`` (validation every N training batches) the callback does
    nothing.
    """

    def __init__(self, epochs: Sequence[int] | None = None, final: bool = True) -> None:
        self.epochs = None if epochs is None else sorted({int(e) for e in epochs})
        self.final = bool(final)
        self._every: int | None = None
        self._active = False

    def should_validate(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether to validate after 0-based ``epoch`` of a run of ``max_epochs`` epochs."""
        if self.final and max_epochs is not None and max_epochs > 0 and epoch == max_epochs - 1:
            return True
        if self.epochs is not None:
            return epoch in self.epochs
        return self._every is not None and (epoch + 1) % self._every == 0

    @staticmethod
    def epochs_in_run(trainer: pl.Trainer) -> int | None:
        """Epochs the fit will start: ``max_epochs``, or fewer when ``max_steps`` runs out first (the last
        one partial); None without an end."""
        bounds = [] if trainer.max_epochs in (None, -1) else [int(trainer.max_epochs)]
        batches = trainer.num_training_batches
        if trainer.max_steps not in (None, -1) and 0 < batches < float("inf"):
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            bounds.append(max(math.ceil(trainer.max_steps / steps_per_epoch), 1))
        return min(bounds) if bounds else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = trainer.check_val_every_n_epoch
        self._active = self._every is not None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed mid-epoch (a preemption checkpoint) gets no on_train_epoch_start for that epoch
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        epoch = trainer.current_epoch
        # (epoch + 1) % (epoch + 2) != 0: Lightning skips validation this epoch.
        validate = self.should_validate(epoch, self.epochs_in_run(trainer))
        trainer.check_val_every_n_epoch = 1 if validate else epoch + 2

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._active and self.final and trainer.max_steps not in (None, -1):
            if trainer.global_step >= trainer.max_steps:
                trainer.should_stop = True  # the budget is spent: validate now, even mid-epoch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            trainer.check_val_every_n_epoch = self._every


# ----------------------------------------------------------------------------------------------------
# Reliability: preemption, non-finite losses, RNG states (README "Reliability", docs/ARCHITECTURE.md traps)
# ----------------------------------------------------------------------------------------------------


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (preemption: SLURM, Kubernetes, any scheduler), write ``<dirpath>/<filename>.ckpt`` at the
    next step boundary and stop; train.py then exits with code 143.

    ``Trainer.fit`` installs the SIGTERM handler, which only records the signal (and forwards it to the DDP
    ranks Lightning started); the loop raises ``SIGTERMException`` after the current training or validation
    batch, or under DDP before the batch all ranks agreed on (:mod:`ssd_lightning.training.sigterm`). This
    callback writes the checkpoint from
    ``on_exception`` through the trainer (``trainer.plugins``:
    :class:`~ssd_lightning.checkpoints.io.AtomicCheckpointIO`, so a second, fatal signal during the write
    leaves the previous file). The checkpoint holds the loop
    position: a mid-epoch resume continues the epoch where it stopped (the data module replays its first
    batches), and one taken during validation runs that validation again from its start.

    Args:
        dirpath: the checkpoint folder (``${paths.output_dir}/checkpoints``: where ``last.ckpt`` is).
        filename: file name without ``.ckpt`` (``last``: what ``ckpt_path=last`` finds).
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.dirpath = str(dirpath)
        self.filename = str(filename)
        #: the checkpoint written after the SIGTERM (None before)
        self.saved_path: str | None = None
        self._restart_validation = False

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.filename + ".ckpt")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:

        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":
            return
        self._restart_validation = bool(trainer.validating)
        try:
            trainer.save_checkpoint(self.path)
        finally:
            self._restart_validation = False
        self.saved_path = self.path

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._restart_validation:
            _restart_validation_on_resume(checkpoint)


def _restart_validation_on_resume(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written during a validation inside ``fit`` run that validation again from its start
    on resume (Lightning would skip what is left of it: the metrics of that epoch would be lost).

    Lightning (2.6) re-runs a validation interrupted inside a batch (``RESTARTED_MID_EVALUATION``: a batch
    started but not processed); the validation loop's progress is rewound to its first batch in that state.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
    if not isinstance(progress, dict) or "total" not in progress or "current" not in progress:
        return
    total, current = progress["total"], progress["current"]
    before = int(total["completed"]) - int(current["completed"])  # val batches of earlier validations
    progress["total"] = {"ready": before + 1, "started": before + 1, "processed": before, "completed": before}
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["is_last_batch"] = False


def _rng_states() -> dict[str, Any]:

    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype("int64")), *map(float, np_state[2:])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:

    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), int(pos), int(has_gauss), float(cached)))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(states["cuda"])


class RNGState(pl.Callback):
    """Save the torch (CPU, CUDA), numpy and Python random-number states in checkpoints; restore them on
    resume, so that anything drawn from them after a resume is what the uninterrupted run drew.

    The states are global rank 0's (Lightning writes rank 0's checkpoint) and are restored on every rank.
    All plain data: the checkpoint still loads with ``torch.load(weights_only=True)``. DALI's augmentation has
    its own seeds (per epoch, see the data module).
    """

    def state_dict(self) -> dict[str, Any]:
        return _rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _set_rng_states(state_dict)


class ModelSummaryPrinter(pl.Callback):
    """Print the network's ``Model FLOPs: ... Params: ...`` / ``Model summary: N layers, ...`` lines
    (:func:`ssd_lightning.model.summary.model_summary`) once, on global rank 0, when training or evaluation
    starts.

    In ``setup``: the process group exists by then (the rank is right under torchrun, SLURM and Lightning's
    own launcher alike) and the network is not yet wrapped or moved.
    """

    def __init__(self) -> None:
        self.printed = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.printed or not trainer.is_global_zero:
            return

        print(model_summary(getattr(pl_module, "model", pl_module)), flush=True)
        self.printed = True


#: exit status of train.py after a SIGTERM that was turned into a checkpoint (128 + 15, as a shell reports it)
PREEMPTED_EXIT_CODE = 143


def exit_preempted(trainer: Any) -> typing.NoReturn:
    """After Lightning's ``SIGTERMException``: say where the checkpoint is and exit with code 143."""

    saved = [c.saved_path for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint) and c.saved_path]
    if trainer.is_global_zero:
        if trainer.state.fn != "fit":
            log.warning("SIGTERM: %s stopped before its end; nothing was written", trainer.state.fn)
        elif saved:
            log.warning(
                "SIGTERM: stopped at epoch %d, step %d; checkpoint %s; resume with ckpt_path=%s",
                trainer.current_epoch,
                trainer.global_step,
                saved[0],
                saved[0],
            )
        else:
            log.warning(
                "SIGTERM: stopped at epoch %d, step %d (no checkpoint callback configured)",
                trainer.current_epoch,
                trainer.global_step,
            )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    raise SystemExit(PREEMPTED_EXIT_CODE)
