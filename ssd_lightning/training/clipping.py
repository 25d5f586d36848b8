"""Gradient clipping (``trainer.gradient_clip_val``) with ``torch.optim``'s fused optimizer kernels.

Lightning's AMP precision plugin (``bf16-mixed`` and ``16-mixed``) refuses to clip the gradients of an
optimizer whose step unscales them itself (the fused kernels): with a GradScaler (``16-mixed``) the
gradients are still scaled when Lightning would clip them. Under ``bf16-mixed`` no GradScaler runs and the
gradients are the true ones, yet the refusal ends the run at its first step (``RuntimeError ... Are you
using a 'fused' optimizer?``): the quickstart (which clips) on a GPU or a bfloat16 CPU, where the non-finite
guard switches SGD to its fused kernel to skip bad steps on the device. :class:`FusedKernelClipping` clips
those gradients as Lightning does for every other precision, so the fused kernel stays, and with it a step
without host reads. With a GradScaler a fused kernel cannot be clipped: :func:`check_fused_clipping` says
so in one line at the start of the fit (``callbacks.fastpath.optimizer=fused``); the non-finite guard keeps
the default kernel then.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.utilities import GradClipAlgorithmType

from ssd_lightning.errors import ConfigError

__all__ = ["FusedKernelClipping", "check_fused_clipping", "grad_scaler"]


def grad_scaler(trainer: pl.Trainer) -> Any:
    """The trainer's GradScaler (``16-mixed`` on a GPU), else None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def check_fused_clipping(trainer: pl.Trainer) -> None:
    """Raise :class:`ConfigError` when the fit would clip gradients scaled by a GradScaler for a fused
    optimizer kernel (``trainer.precision=16-mixed``, ``trainer.gradient_clip_val`` and
    ``callbacks.fastpath.optimizer=fused``)."""
    if not trainer.gradient_clip_val or grad_scaler(trainer) is None:
        return
    if any(_optimizer_handles_unscaling(optimizer) for optimizer in trainer.optimizers):
        raise ConfigError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} with trainer.precision="
            f"{trainer.precision}: the fused optimizer kernel unscales the gradients inside its step, after "
            "they would be clipped; set callbacks.fastpath.optimizer=auto (or foreach), or "
            "trainer.precision=bf16-mixed"
        )


class FusedKernelClipping:
    """LightningModule mixin: ``configure_gradient_clipping`` clips a fused kernel's gradients itself when
    no GradScaler scales them (by norm or value, as ``trainer.gradient_clip_algorithm`` says); otherwise
    Lightning's own clipping."""

    trainer: pl.Trainer

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        unscaled = grad_scaler(self.trainer) is None
        if gradient_clip_val and unscaled and _optimizer_handles_unscaling(optimizer):
            algorithm = gradient_clip_algorithm or GradClipAlgorithmType.NORM
            if not isinstance(algorithm, GradClipAlgorithmType):
                algorithm = GradClipAlgorithmType(str(algorithm).lower())
            # the base class's clipping: the AMP plugin's override only adds the refusal
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(  # type: ignore[misc]
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )
