"""The non-finite guard: skip optimizer steps with a non-finite loss or gradients, stop after too many in a
row, without making the host wait for the device in a steady-state step.

Re-exported by :mod:`ssd_lightning.training.callbacks` (``conf/callbacks/reliability.yaml``:
``callbacks.non_finite``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from ssd_lightning.errors import NonFiniteLossError
from ssd_lightning.training.clipping import grad_scaler
from ssd_lightning.training.fastpath import HostCopy, set_optimizer_impl

__all__ = ["NonFiniteGuard"]

log = logging.getLogger("ssd_lightning")

#: devices whose torch.optim fused kernels exist (and take a ``found_inf`` flag)
_FUSED_DEVICES = ("cuda", "cpu")


@dataclass
class _Step:
    """One optimizer step's flags (``[loss_bad, grads_bad]``, OR-ed over the ranks) on their way to the
    host, and where the step was."""

    flags: HostCopy
    step: int
    epoch: int
    batch_idx: int
    image_ids: torch.Tensor | None


class _BufferSnapshot:
    """A copy of the module's buffers (BatchNorm running statistics and batch counts), one flat tensor per
    dtype: a few large copies per step instead of one per buffer."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for b in buffers:
            self.groups.setdefault((b.device, b.dtype), []).append(b)
        self.flat = {key: torch.cat([b.detach().reshape(-1) for b in bs]) for key, bs in self.groups.items()}

    def take(self) -> None:
        """Copy the buffers into the snapshot (no host synchronisation)."""
        with torch.no_grad():
            for key, bs in self.groups.items():
                torch.cat([b.reshape(-1) for b in bs], out=self.flat[key])

    def restore(self, where: torch.Tensor | None = None) -> None:
        """Put the snapshot back into the buffers; with ``where`` (a bool scalar on the device), only if it is
        true, decided on the device."""
        with torch.no_grad():
            for key, bs in self.groups.items():
                flat = self.flat[key]
                if where is not None:
                    flat = torch.where(where.to(flat.device), flat, torch.cat([b.reshape(-1) for b in bs]))
                parts = flat.split([b.numel() for b in bs])
                torch._foreach_copy_(bs, [p.view_as(b) for p, b in zip(parts, bs, strict=True)])


class NonFiniteGuard(pl.Callback):
    """Skip optimizer steps with a non-finite loss or gradients; stop after ``max_bad_steps`` in a row.

    Per optimizer step: the loss of every micro-batch (``on_before_backward``) and, without a gradient
    scaler, the gradient norms (one fused ``_foreach_norm``) are checked on the device; under DDP the two
    flags are summed over the ranks with one small ``all_reduce`` (no barrier), so every rank skips and stops
    together.

    A bad step is skipped on the device: the flag is handed to the optimizer's fused kernel as ``found_inf``
    (the kernel then leaves the parameters and the momentum untouched, as for AMP's skipped steps), and the
    BatchNorm running statistics are put back to their values before the step's forward pass with a
    ``torch.where`` on the flag. So the model stays the last good one and every checkpoint written
    afterwards (``last.ckpt``, ``best.ckpt``) is finite. The flags travel to the host asynchronously
    (:class:`~ssd_lightning.training.fastpath.HostCopy`) and are read one step later, when the next step's
    work is queued (the device never idles for them), at the end of each epoch and before a checkpoint is
    written. A bad step is then reported as ``non-finite loss at step S (epoch E, batch B)``; after
    ``max_bad_steps`` bad steps in a row training stops with :class:`~ssd_lightning.errors.NonFiniteLossError`
    (one line from train.py, exit code 1) before any further checkpoint is written. The learning-rate
    schedule still advances, as for AMP's skipped steps. So a steady-state step makes no blocking host read.

    The fused kernel: a ``torch.optim`` optimizer left at PyTorch's default kernel
    (``callbacks.fastpath.optimizer=auto``) on CUDA or CPU parameters is switched to its fused kernel at the
    start of training (same update; on the CPU bit-identical for SGD), and missing momentum buffers are
    created as zeros (what the first step would compute from, so that a skipped first step leaves them
    defined). ``skip_on_device=false``, an explicitly chosen other kernel (``foreach``/``loop``), gradient
    clipping with a GradScaler or SGD with dampening keep the kernel as it is; the flags are then read on the
    host at every step, before the optimizer step, and a bad step's gradients are dropped (SGD leaves
    parameters without gradients and their momentum untouched).

    With a GradScaler (``16-mixed`` on GPU) the scaler skips steps with non-finite gradients by design (loss
    scale overflow; with the fused kernel, on the device too): those are normal and neither reported nor
    counted. The loss is then checked after the step (``on_train_batch_end``, unscaled): a non-finite one is
    reported and counted, and the BatchNorm statistics are put back.

    Args:
        max_bad_steps: bad optimizer steps in a row that stop training (>= 1).
        check_gradients: also check the gradients (non-finite gradients with a finite loss), when no
            GradScaler does.
        skip_on_device: skip bad steps on the device through the optimizer's fused kernel (no host read per
            step); false: read the flags on the host before every optimizer step.
    """

    def __init__(
        self, max_bad_steps: int = 5, check_gradients: bool = True, skip_on_device: bool = True
    ) -> None:
        if int(max_bad_steps) < 1:
            raise ValueError(f"callbacks.non_finite.max_bad_steps={max_bad_steps}: must be >= 1")
        self.max_bad_steps = int(max_bad_steps)
        self.check_gradients = bool(check_gradients)
        self.skip_on_device = bool(skip_on_device)
        #: bad optimizer steps in a row so far, and in total (as far as the host has read the flags)
        self.bad_in_row = 0
        self.bad_total = 0
        #: whether bad steps are skipped on the device in this run (decided at the start of training)
        self.on_device = False
        self._loss_bad: torch.Tensor | None = None
        self._snapshot: _BufferSnapshot | None = None
        self._window_open = False
        self._batch: tuple[int, torch.Tensor | None] = (0, None)
        self._pending: deque[_Step] = deque()

    # ----------------------------------------------------------------------------------------------------
    # set-up: the buffers, the optimizer kernel
    # ----------------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        buffers = list(pl_module.buffers())  # BatchNorm running statistics and batch counts
        self._snapshot = _BufferSnapshot(buffers) if buffers else None
        self._window_open = False
        self._loss_bad = None
        self._pending.clear()
        self.on_device = self.skip_on_device and all(
            self._use_fused_kernel(trainer, optimizer) for optimizer in trainer.optimizers
        )

    def _use_fused_kernel(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` now runs its fused kernel (switched from PyTorch's default if it can be)."""
        groups = optimizer.param_groups
        if not groups or any("fused" not in g for g in groups):
            return False  # not a torch.optim optimizer with a fused kernel
        if any(g.get("dampening", 0) for g in groups):
            return False  # zero momentum buffers would not give the first step's update
        params = [p for g in groups for p in g["params"]]
        if not all(g["fused"] for g in groups):
            default_kernel = all(not g["fused"] and g.get("foreach") is None for g in groups)
            clipping = grad_scaler(trainer) is not None and trainer.gradient_clip_val
            if not default_kernel or clipping or any(p.device.type not in _FUSED_DEVICES for p in params):
                log.info("non-finite guard: the optimizer keeps its kernel; the flags are read every step")
                return False
            set_optimizer_impl(optimizer, "fused")
            log.info("non-finite guard: %s runs its fused kernel (bad steps skipped on the device)",
                     type(optimizer).__name__)  # fmt: skip
        for group in groups:
            if group.get("momentum", 0):
                for p in group["params"]:
                    state = optimizer.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return True

    # ----------------------------------------------------------------------------------------------------
    # per step: flags on the device
    # ----------------------------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._window_open:  # the first micro-batch of an optimizer step
            if self._snapshot is not None:
                self._snapshot.take()
            self._window_open = True
        ids = batch.get("image_ids") if isinstance(batch, dict) else None
        self._batch = (batch_idx, ids)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if grad_scaler(trainer) is not None:
            return  # the loss scaled by the GradScaler: an overflow there is normal (checked after the step)
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def _any_rank(self, trainer: pl.Trainer, flags: torch.Tensor) -> torch.Tensor:
        """``flags`` (int tensor on the module's device) summed over the DDP ranks: one all-reduce, enqueued
        without a barrier (Lightning's ``strategy.reduce`` makes one first)."""
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return flags

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._window_open = False
        if grad_scaler(trainer) is not None:
            return  # the GradScaler skips steps with non-finite gradients itself
        device = pl_module.device
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.bool)
        self._loss_bad = None
        grads_bad = torch.zeros((), dtype=torch.bool, device=device)
        if self.check_gradients:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                grads_bad = ~torch.isfinite(torch.stack([n.float() for n in norms])).all()
        flags = self._any_rank(trainer, torch.stack([loss_bad.to(device), grads_bad.to(device)]).int())
        if self.on_device:
            self._record(trainer, flags, trainer.global_step)
            bad = flags.sum() > 0
            optimizer.found_inf = bad.float()  # type: ignore[attr-defined]  # the fused kernel skips the step
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            if self._snapshot is not None:
                self._snapshot.restore(where=bad)
            return
        loss_is_bad, grads_are_bad = flags.tolist()  # the host waits for the device here
        if loss_is_bad or grads_are_bad:
            optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
            if self._snapshot is not None:
                self._snapshot.restore()
        self._count(trainer, self._step(trainer, flags, trainer.global_step))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the flags of earlier steps: the device has long finished them, this step's work is queued
        self._read_flags(trainer, before_step=trainer.global_step - 1)
        if grad_scaler(trainer) is not None:
            self._check_amp_loss(trainer, pl_module, outputs)
        if batch_idx + 1 >= trainer.num_training_batches:
            self._read_flags(trainer)  # the epoch's last step: read before validation and checkpoints

    def _check_amp_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        """AMP: the step is over (the GradScaler skipped it if the gradients were not finite); a non-finite
        loss (unscaled, as training_step returned it) is what is reported and counted."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not torch.is_tensor(loss):
            return
        loss_bad = (~torch.isfinite(loss.detach()).all()).to(pl_module.device)
        flags = self._any_rank(trainer, torch.stack([loss_bad, torch.zeros_like(loss_bad)]).int())
        self._record(trainer, flags, max(trainer.global_step - 1, 0))
        if self._snapshot is not None:
            self._snapshot.restore(where=flags[0] > 0)

    # ----------------------------------------------------------------------------------------------------
    # on the host: counting, reporting, stopping
    # ----------------------------------------------------------------------------------------------------

    def _step(self, trainer: pl.Trainer, flags: torch.Tensor, step: int) -> _Step:
        batch_idx, ids = self._batch
        return _Step(HostCopy(flags), step, trainer.current_epoch, batch_idx, ids)

    def _record(self, trainer: pl.Trainer, flags: torch.Tensor, step: int) -> None:
        """Send the step's flags to the host; they are read a step later."""
        self._pending.append(self._step(trainer, flags, step))

    def _read_flags(self, trainer: pl.Trainer, before_step: int | None = None) -> None:
        """Count the pending steps (older than ``before_step``; None: all), in order."""
        while self._pending and (before_step is None or self._pending[0].step < before_step):
            self._count(trainer, self._pending.popleft())

    def _count(self, trainer: pl.Trainer, step: _Step) -> None:
        """Count, report, and stop after max_bad_steps."""
        loss_is_bad, grads_are_bad = (v > 0 for v in step.flags.tolist())
        if not (loss_is_bad or grads_are_bad):
            self.bad_in_row = 0
            return
        what = "loss" if loss_is_bad else "gradients (finite loss)"
        self.bad_in_row += 1
        self.bad_total += 1
        where = f"step {step.step} (epoch {step.epoch}, batch {step.batch_idx}"
        if step.image_ids is not None:
            where += f", image ids {[int(i) for i in step.image_ids.reshape(-1).tolist()]}"
        where += ")"
        log.warning(
            "non-finite %s at %s: optimizer step skipped (%d in a row, training stops at %d)",
            what, where, self.bad_in_row, self.max_bad_steps,
        )  # fmt: skip
        if self.bad_in_row >= self.max_bad_steps:
            self._pending.clear()
            raise NonFiniteLossError(
                f"training stopped: non-finite {what} in {self.bad_in_row} optimizer steps in a row, the "
                f"last at {where}; the checkpoints hold the last good model. Lower optim.lr, check the data, "
                "or raise callbacks.non_finite.max_bad_steps"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_flags(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_flags(trainer)
        for optimizer in trainer.optimizers:
            for name in ("found_inf", "grad_scale"):
                if self.on_device and hasattr(optimizer, name) and grad_scaler(trainer) is None:
                    delattr(optimizer, name)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._read_flags(trainer)  # max_bad_steps reached: stop before this checkpoint is written
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
