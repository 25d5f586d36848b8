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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


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


class WarmupMultiStepLR(LRScheduler):
    """Per-step linear warmup times a per-epoch multi-step decay.

    The rate of every group at optimizer step ``s`` (0-based) during epoch ``e`` (0-based) is::

        base_lr * min(1, (s + 1) / warmup_steps) * gamma ** (number of milestones <= e)

    Step it after every optimizer step (Lightning: ``interval="step"``) and call :meth:`set_epoch` at the
    start of every epoch. ``state_dict()`` holds plain numbers only (``torch.load(weights_only=True)`` reads
    it).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        milestones: Sequence[int] = (43, 54),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={warmup_steps}: must be >= 0")
        self.warmup_steps = int(warmup_steps)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.epoch = 0
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int, epoch: int) -> float:
        """The multiplier of the base rate at optimizer step ``step`` of epoch ``epoch`` (both 0-based)."""
        warm = 1.0 if self.warmup_steps <= 0 else min(1.0, (step + 1) / self.warmup_steps)
        decays = sum(1 for m in self.milestones if m <= epoch)
        return warm * self.gamma**decays

    def get_lr(self) -> list[float]:
        f = self.factor(max(self.last_epoch, 0), self.epoch)
        return [base * f for base in self.base_lrs]

    def set_epoch(self, epoch: int) -> None:
        """Enter epoch ``epoch`` (0-based): apply its decay to the rate of the next step."""
        self.epoch = int(epoch)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
