"""Lightning callbacks used by the Hydra configs (``conf/callbacks/``) and by every task.

* :class:`ValidationSchedule`: validate after listed epochs (NVIDIA's evaluation epochs) and after the last;
* :class:`PreemptionCheckpoint` and :func:`exit_preempted`: SIGTERM becomes a checkpoint and exit code 143;
* :class:`NonFiniteGuard`: stop after too many optimizer steps in a row with a non-finite loss or gradients;
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

from ssd_lightning.errors import NonFiniteLossError
from ssd_lightning.model.summary import model_summary

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

    ``Trainer.fit`` installs Lightning's SIGTERM handler, which only records the signal (and forwards it to
    the DDP ranks Lightning started); the loop raises ``SIGTERMException`` after the current training or
    validation batch, on every rank at the same batch. This callback writes the checkpoint from
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


class NonFiniteGuard(pl.Callback):
    """Skip optimizer steps with a non-finite loss or gradients; stop after ``max_bad_steps`` in a row.

    Per optimizer step: the loss of every micro-batch (``on_before_backward``) and, without a gradient
    scaler, the gradient norms (one fused ``_foreach_norm``) are checked on the device; the flags are read in
    one host synchronisation per step (the same one AMP's GradScaler makes). A bad step is reported as
    ``non-finite loss at step S (epoch E, batch B)`` and skipped: its gradients are dropped (SGD leaves
    parameters without gradients and their momentum untouched) and the BatchNorm running statistics are put
    back to their values before the step's forward pass, so the model stays the last good one and every
    checkpoint written afterwards (``last.ckpt``, ``best.ckpt``) is finite. The learning-rate schedule still
    advances, as for AMP's skipped steps. After ``max_bad_steps`` bad steps in a row training stops with
    :class:`~ssd_lightning.errors.NonFiniteLossError` (one line from train.py, exit code 1) before any
    further checkpoint is written.

    With a GradScaler (``16-mixed`` on GPU) the scaler skips steps with non-finite gradients by design (loss
    scale overflow): those are normal and neither reported nor counted. The loss is then checked after the
    step (``on_train_batch_end``, unscaled): a non-finite one is reported and counted, and the BatchNorm
    statistics are put back. With DDP the flags are summed over the ranks (one small all-reduce per step),
    so every rank skips and stops together.

    Args:
        max_bad_steps: bad optimizer steps in a row that stop training (>= 1).
        check_gradients: also check the gradients (non-finite gradients with a finite loss), when no
            GradScaler does.
    """

    def __init__(self, max_bad_steps: int = 5, check_gradients: bool = True) -> None:
        if int(max_bad_steps) < 1:
            raise ValueError(f"callbacks.non_finite.max_bad_steps={max_bad_steps}: must be >= 1")
        self.max_bad_steps = int(max_bad_steps)
        self.check_gradients = bool(check_gradients)
        #: bad optimizer steps in a row so far, and in total
        self.bad_in_row = 0
        self.bad_total = 0
        self._loss_bad: torch.Tensor | None = None
        self._buffers: list[torch.Tensor] = []
        self._snapshot: list[torch.Tensor] | None = None
        self._window_open = False
        self._batch: tuple[int, list[int] | None] = (0, None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffers = list(pl_module.buffers())  # BatchNorm running statistics and batch counts
        self._snapshot = None
        self._window_open = False
        self._loss_bad = None

    def _scaler(self, trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._window_open:  # the first micro-batch of an optimizer step
            if self._snapshot is None or len(self._snapshot) != len(self._buffers):
                self._snapshot = [b.detach().clone() for b in self._buffers]
            else:
                torch._foreach_copy_(self._snapshot, [b.detach() for b in self._buffers])  # fused, no sync
            self._window_open = True
        ids = batch.get("image_ids") if isinstance(batch, dict) else None
        self._batch = (batch_idx, None)
        if ids is not None:
            self._batch = (batch_idx, ids)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._scaler(trainer) is not None:
            return  # the loss scaled by the GradScaler: an overflow there is normal (checked after the step)
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def _any_rank(self, trainer: pl.Trainer, flags: torch.Tensor) -> list[bool]:
        """``flags`` (int tensor) OR-ed over the DDP ranks, read on the host (the one synchronisation)."""
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        return [int(v) > 0 for v in flags.tolist()]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._window_open = False
        if self._scaler(trainer) is not None:
            return  # the GradScaler skips steps with non-finite gradients itself
        device = pl_module.device
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.bool)
        self._loss_bad = None
        grads_bad = torch.zeros((), dtype=torch.bool, device=loss_bad.device)
        if self.check_gradients:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                grads_bad = ~torch.isfinite(torch.stack([n.float() for n in norms])).all()
        loss_is_bad, grads_are_bad = self._any_rank(
            trainer, torch.stack([loss_bad.to(device), grads_bad.to(device)]).int()
        )
        if not (loss_is_bad or grads_are_bad):
            self.bad_in_row = 0
            return
        optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
        self._bad_step(trainer, "loss" if loss_is_bad else "gradients (finite loss)", trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._scaler(trainer) is None:
            return
        # AMP: the step is over (the GradScaler skipped it if the gradients were not finite); a non-finite
        # loss (unscaled, as training_step returned it) is what is reported and counted
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not torch.is_tensor(loss):
            return
        [bad] = self._any_rank(trainer, (~torch.isfinite(loss.detach()).all()).int().reshape(1))
        if not bad:
            self.bad_in_row = 0
            return
        self._bad_step(trainer, "loss", max(trainer.global_step - 1, 0))

    def _bad_step(self, trainer: pl.Trainer, what: str, step: int) -> None:
        """Count, undo the forward pass's BatchNorm updates, report, and stop after max_bad_steps."""
        self.bad_in_row += 1
        self.bad_total += 1
        if self._snapshot is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._snapshot)
        batch_idx, ids = self._batch
        where = f"step {step} (epoch {trainer.current_epoch}, batch {batch_idx}"
        if ids is not None:
            where += f", image ids {[int(i) for i in ids.reshape(-1).tolist()]}"
        where += ")"
        log.warning(
            "non-finite %s at %s: optimizer step skipped (%d in a row, training stops at %d)",
            what, where, self.bad_in_row, self.max_bad_steps,
        )  # fmt: skip
        if self.bad_in_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"training stopped: non-finite {what} in {self.bad_in_row} optimizer steps in a row, the "
                f"last at {where}; the checkpoints hold the last good model. Lower optim.lr, check the data, "
                "or raise callbacks.non_finite.max_bad_steps"
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # never write a broken model (weights can also overflow without a non-finite gradient)
        state = checkpoint.get("state_dict") or {}
        tensors = [(k, v) for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(v).all() for _, v in tensors])
        if bool(finite.all()):
            return

        bad = tensors[int((~finite).nonzero()[0])][0]
        raise NonFiniteLossError(
            f"training stopped: the model has non-finite values ({bad}) at step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}); the checkpoint was not written, the ones on disk hold the last good "
            "model. Lower optim.lr or check the data"
        )


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
