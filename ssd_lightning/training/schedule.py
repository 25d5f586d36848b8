"""NVIDIA's optimiser recipe as pure functions and one scheduler (NVIDIA: ``PyTorch/Detection/SSD/main.py``).

* SGD, momentum 0.9, weight decay 5e-4 on the convolution weights only: BatchNorm weights/biases and every
  bias get weight decay 0 (NVIDIA's ``tencent_trick``: parameters with one dimension or named ``*.bias``).
* Learning rate ``lr x global_batch / reference_batch_size`` (2.6e-3 per 32 images), the global batch being
  ``batch_size x world_size x accumulate_grad_batches``.
* Linear warmup over ``warmup_steps`` optimizer steps: step ``s`` (0-based) runs at ``(s + 1) / warmup_steps``
  of the rate, so the first step already learns and the rate reaches the full value at step
  ``warmup_steps - 1`` (NVIDIA runs step 0 at rate 0 and plateaus at ``(W - 1) / W`` of it; a deliberate,
  documented deviation).
* ``x gamma`` (0.1) from each epoch (0-based) listed in ``milestones`` (43 and 54 of 65), as NVIDIA's
  ``MultiStepLR`` stepped after every epoch.

Fractions of the run (every recipe): a warmup or a milestone strictly between 0 and 1 is that fraction of the
run, so that a shorter ``trainer.max_epochs`` or ``trainer.max_steps`` keeps the schedule's shape
(:func:`resolve_schedule`). A run bounded by epochs turns a fractional milestone into the epoch
``round(f x max_epochs)`` (0.66 and 0.83 of 65 are NVIDIA's 43 and 54); a run bounded by optimizer steps
(``trainer.max_steps``, the quickstart) into the step ``round(f x max_steps)``. A fractional warmup is
``round(f x total optimizer steps)`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from ssd_lightning.errors import ConfigError


def scaled_lr(lr: float, global_batch_size: int, reference_batch_size: int = 32) -> float:
    """NVIDIA's learning-rate scaling: ``lr`` is given per ``reference_batch_size`` images."""
    return float(lr) * global_batch_size / reference_batch_size


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two SGD parameter groups: ``decay`` (conv/linear weights, ``weight_decay``) and ``no_decay`` (BatchNorm
    weights and biases, every bias: weight decay 0), as NVIDIA's ``tencent_trick``. Frozen parameters are left
    out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def is_fraction(value: float) -> bool:
    """Whether a warmup length or a milestone stands for a fraction of the run (strictly between 0 and 1)."""
    return 0 < float(value) < 1


def _whole_or_fraction(key: str, value: float) -> int | float:
    """``value`` as a plain int (a count) or float (a fraction of the run); anything else is a ConfigError."""
    if is_fraction(value):
        return float(value)
    if float(value) < 0 or float(value) != int(value):
        raise ConfigError(
            f"{key}={value}: give a whole number (>= 0) or a fraction of the run strictly between 0 and 1"
        )
    return int(value)


def warmup_value(warmup_steps: float) -> int | float:
    """``optim.warmup_steps`` checked: optimizer steps (int) or a fraction of the run (float in (0, 1))."""
    return _whole_or_fraction("optim.warmup_steps", warmup_steps)


def milestone_values(milestones: Sequence[float]) -> list[int | float]:
    """``optim.milestones`` checked and sorted: all epochs (ints) or all fractions of the run (floats)."""
    values = sorted(_whole_or_fraction("optim.milestones", m) for m in milestones)
    if len({isinstance(v, float) for v in values}) > 1:
        raise ConfigError(
            f"optim.milestones={values} mixes epochs and fractions of the run: give all as epochs "
            "(e.g. [43, 54]) or all as fractions (e.g. [0.66, 0.83])"
        )
    return values


@dataclass(frozen=True)
class RunLength:
    """How long a training run is, in optimizer steps.

    Attributes:
        total_steps: optimizer steps of the whole run (Lightning's ``estimated_stepping_batches``).
        batches_per_epoch: training batches per epoch (per rank).
        steps_per_epoch: optimizer steps per epoch (``ceil(batches / accumulate_grad_batches)``).
        bounded_by: ``"steps"`` when ``trainer.max_steps`` ends the run, ``"epochs"`` when
            ``trainer.max_epochs`` does.
    """

    total_steps: int
    batches_per_epoch: int
    steps_per_epoch: int
    bounded_by: str

    @property
    def epochs(self) -> float:
        """The run's length in epochs (the last one partial when the step budget ends it mid-epoch)."""
        return self.total_steps / self.steps_per_epoch

    def describe(self) -> str:
        """E.g. ``320 optimizer steps = 21.3 epochs of 15 batches``."""
        per_epoch = f"{self.batches_per_epoch} batches"
        if self.steps_per_epoch != self.batches_per_epoch:
            per_epoch += f" ({self.steps_per_epoch} optimizer steps)"
        return f"{self.total_steps} optimizer steps = {self.epochs:.1f} epochs of {per_epoch}"


def run_length(
    max_epochs: int | None, max_steps: int | None, batches_per_epoch: int, accumulate: int = 1
) -> RunLength | None:
    """The run's length from the Trainer's limits (-1 or None: no limit); None when it has no end.

    The step budget wins when it ends the run first: ``max_steps=320`` with 15 batches per epoch and no epoch
    limit is ``RunLength(320, 15, 15, "steps")``, 21.3 epochs.
    """
    steps_per_epoch = max(math.ceil(int(batches_per_epoch) / max(int(accumulate), 1)), 1)
    by_epochs = None if max_epochs in (None, -1) else int(max_epochs) * steps_per_epoch
    by_steps = None if max_steps in (None, -1) else int(max_steps)
    if by_epochs is None and by_steps is None:
        return None
    if by_steps is not None and (by_epochs is None or by_steps < by_epochs):
        return RunLength(by_steps, int(batches_per_epoch), steps_per_epoch, "steps")
    return RunLength(int(by_epochs), int(batches_per_epoch), steps_per_epoch, "epochs")


def trainer_run_length(trainer: Any) -> RunLength | None:
    """The length of ``trainer``'s fit (None: no end), once its training data is set up (``on_train_start``).

    Not earlier: setting the data up from ``configure_optimizers`` (as Lightning's
    ``estimated_stepping_batches`` does) runs before a checkpoint is restored, and Lightning then never gives
    the data loader its saved position (a mid-epoch resume would not replay its batches).
    """
    if trainer.max_steps in (None, -1) and trainer.max_epochs in (None, -1):
        return None
    batches = trainer.num_training_batches
    if batches == float("inf"):  # no length: only a step budget can end the run
        batches = trainer.max_steps if trainer.max_steps not in (None, -1) else 1
    return run_length(trainer.max_epochs, trainer.max_steps, int(batches), trainer.accumulate_grad_batches)


@dataclass(frozen=True)
class Schedule:
    """A schedule in absolute units: warmup in optimizer steps, decays at epochs and/or optimizer steps."""

    warmup_steps: int
    epoch_milestones: tuple[int, ...]
    step_milestones: tuple[int, ...]

    def describe(self, gamma: float) -> str:
        """E.g. ``warmup 48 steps; x0.1 at steps [256]``."""
        decays = []
        if self.epoch_milestones:
            decays.append(f"epochs {list(self.epoch_milestones)}")
        if self.step_milestones:
            decays.append(f"steps {list(self.step_milestones)}")
        return f"warmup {self.warmup_steps} steps; x{gamma:g} at " + (" and ".join(decays) or "no step")


def resolve_schedule(warmup_steps: float, milestones: Sequence[float], length: RunLength | None) -> Schedule:
    """Turn fractions of the run into steps or epochs (see the module docstring); counts stay as they are.

    Example: warmup 0.15 and milestones [0.8] on ``RunLength(320, 15, 15, "steps")`` are 48 warmup steps
    and a decay from step 256; milestones [0.66, 0.83] on a 65-epoch run are epochs 43 and 54.
    """
    warmup = warmup_value(warmup_steps)
    marks = milestone_values(milestones)
    fractions = is_fraction(warmup) or any(isinstance(m, float) for m in marks)
    if fractions and length is None:
        raise ConfigError(
            f"optim.warmup_steps={warmup_steps} / optim.milestones={list(milestones)} are fractions of the "
            "run but the run has no end: set trainer.max_steps or trainer.max_epochs"
        )
    if is_fraction(warmup):
        warmup = round(warmup * length.total_steps)
    epochs = tuple(m for m in marks if isinstance(m, int))
    steps: tuple[int, ...] = ()
    fractional = [m for m in marks if isinstance(m, float)]
    if fractional and length.bounded_by == "epochs":
        epochs = tuple(round(f * length.epochs) for f in fractional)
    elif fractional:
        steps = tuple(round(f * length.total_steps) for f in fractional)
    return Schedule(int(warmup), epochs, steps)


class WarmupMultiStepLR(LRScheduler):
    """Per-step linear warmup times a multi-step decay at epochs and/or optimizer steps.

    The rate of every group at optimizer step ``s`` (0-based) during epoch ``e`` (0-based) is::

        base_lr * min(1, (s + 1) / warmup_steps)
                * gamma ** (number of milestones <= e + number of step_milestones <= s)

    Step it after every optimizer step (Lightning: ``interval="step"``) and call :meth:`set_epoch` at the
    start of every epoch. ``state_dict()`` holds plain numbers only (``torch.load(weights_only=True)`` reads
    it). On resume the checkpoint gives the position (step, epoch, base rates) and the config the schedule
    (warmup, milestones, gamma), so a resumed run with a longer ``trainer.max_steps`` spreads its fractions
    over the new length.
    """

    #: what the config defines (kept from the constructor when a checkpoint's state is loaded)
    DEFINITION = ("warmup_steps", "milestones", "step_milestones", "gamma")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        milestones: Sequence[int] = (43, 54),
        gamma: float = 0.1,
        last_epoch: int = -1,
        step_milestones: Sequence[int] = (),
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={warmup_steps}: must be >= 0")
        self.warmup_steps = int(warmup_steps)
        self.milestones = sorted(int(m) for m in milestones)
        self.step_milestones = sorted(int(m) for m in step_milestones)
        self.gamma = float(gamma)
        self.epoch = 0
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int, epoch: int) -> float:
        """The multiplier of the base rate at optimizer step ``step`` of epoch ``epoch`` (both 0-based)."""
        warm = 1.0 if self.warmup_steps <= 0 else min(1.0, (step + 1) / self.warmup_steps)
        decays = sum(1 for m in self.milestones if m <= epoch) + sum(
            1 for m in self.step_milestones if m <= step
        )
        return warm * self.gamma**decays

    def apply(self, schedule: Schedule, epoch: int) -> None:
        """Use ``schedule`` from now on (at training start: the run's length is known), in ``epoch``."""
        self.warmup_steps = schedule.warmup_steps
        self.milestones = sorted(schedule.epoch_milestones)
        self.step_milestones = sorted(schedule.step_milestones)
        self.set_epoch(epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self.DEFINITION})

    def get_lr(self) -> list[float]:
        f = self.factor(max(self.last_epoch, 0), self.epoch)
        return [base * f for base in self.base_lrs]

    def set_epoch(self, epoch: int) -> None:
        """Enter epoch ``epoch`` (0-based): apply its decay to the rate of the next step."""
        self.epoch = int(epoch)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
