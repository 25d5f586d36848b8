"""Epoch means of per-step values across ranks with torchmetrics, without a host read per step.

torchmetrics' ``MeanMetric`` keeps a weighted sum and a weight sum on the device and all-reduces them once,
when Lightning computes it at the epoch end. Two details of torchmetrics 1.9 would make the host wait or give
a wrong mean, hence :class:`WeightedMean`: its NaN check (``nan_strategy`` other than ``"disable"``) reads
the device on every update, and with ``"disable"`` it replaces the weights by ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MeanMetric

__all__ = ["EpochMeans", "WeightedMean"]


class WeightedMean(MeanMetric):
    """``MeanMetric`` whose ``update(value, weight)`` only adds on the device: no NaN check, weights kept."""

    def __init__(self) -> None:
        super().__init__(nan_strategy="disable")

    def update(self, value: torch.Tensor, weight: torch.Tensor) -> None:  # type: ignore[override]
        self.mean_value += (value * weight).sum()
        self.weight += weight.sum()


class EpochMeans(torch.nn.ModuleDict):
    """One :class:`WeightedMean` per name. Their states are not persistent: a checkpoint holds none of them.

    Args:
        names: the values' names, in the order :meth:`add` receives them.
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__({name: WeightedMean() for name in names})

    def add(self, values: Sequence[torch.Tensor], batch_size: int) -> None:
        """Add one step: ``values`` (0-dim tensors, in ``names`` order) weighted by ``batch_size``. A value
        that is not finite is left out (weight 0), decided on the device."""
        for mean, value in zip(self.values(), values, strict=True):
            value = value.detach()
            finite = torch.isfinite(value)
            mean.update(torch.where(finite, value, 0.0), torch.where(finite, float(batch_size), 0.0))
