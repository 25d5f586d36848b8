"""Model size and cost, printed as the original SSD300 project's README prints them.

``Model FLOPs: 20.213G Params: 22.895M`` and
``Model summary: 173 layers, 22894902 parameters, 22894902 gradients`` for the default SSD300 (ResNet-50,
81 classes). The conventions reproduce those figures:

* layers: ``len(list(model.modules()))``, every module including containers and the model itself (YOLOv5's
  ``model_info`` convention): 143 leaf modules + 30 containers = 173 for SSD300-ResNet-50.
* FLOPs: thop's convention (``thop.profile`` on the model in eval mode at 1x3x300x300), i.e. multiply-adds:
  a convolution costs one per weight tap per output element plus one per output element for its bias, an
  eval-mode BatchNorm two per element, ReLU/pooling/residual adds nothing. Counted with
  :class:`torch.utils.flop_counter.FlopCounterMode` and custom formulas for convolution and batch norm
  (its own formulas count a multiply-add as 2 FLOPs: 40.302G for SSD300-ResNet-50, of which
  20.151G multiply-adds in convolutions; + 0.742M bias adds + 61.162M BN ops = 20.213G).

Command line (Hydra-style ``key=value`` overrides of the ``model`` group, or a checkpoint)::

    python -m ssd_lightning.summary                                   # SSD300-ResNet-50, 81 classes
    python -m ssd_lightning.summary model.backbone=resnet18 model.num_classes=5
    python -m ssd_lightning.summary ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten


@dataclass(frozen=True)
class ModelSummary:
    """Counts: modules (``layers``), parameters, trainable parameters (``gradients``), ``flops`` (thop)."""

    layers: int
    parameters: int
    gradients: int
    flops: int

    def __str__(self) -> str:
        return (
            f"Model FLOPs: {_si(self.flops)} Params: {_si(self.parameters)}\n"
            f"Model summary: {self.layers} layers, {self.parameters} parameters, {self.gradients} gradients"
        )


def model_summary(model: nn.Module, image_size: int = 300) -> ModelSummary:
    """Summarise ``model``; FLOPs of one ``[1, 3, image_size, image_size]`` image (see the module doc)."""
    return ModelSummary(
        layers=len(list(model.modules())),
        parameters=sum(p.numel() for p in model.parameters()),
        gradients=sum(p.numel() for p in model.parameters() if p.requires_grad),
        flops=count_flops(model, image_size),
    )


def count_flops(model: nn.Module, image_size: int = 300) -> int:
    """thop-convention FLOPs (multiply-adds) of one eval-mode forward pass on a ``[1,3,S,S]`` input."""
    param = next(model.parameters())
    images = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    mapping = {aten.convolution: _conv_macs, aten._convolution: _conv_macs}
    # FlopCounterMode looks an op up by overload (else decomposes it) and then counts it by packet: key both.
    for packet in (aten.native_batch_norm, aten._native_batch_norm_legit_no_training, aten.cudnn_batch_norm):
        mapping |= {packet: _bn_ops, packet.default: _bn_ops}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(images)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _conv_macs(
    x_shape, w_shape, bias, stride, padding, dilation, transposed, *args, out_shape=None, **kwargs
):
    macs = conv_flop_count(x_shape, w_shape, out_shape, transposed=transposed) // 2
    return macs + (math.prod(out_shape) if bias is not None else 0)


def _bn_ops(x_shape, *args, out_shape=None, **kwargs):
    return 2 * math.prod(x_shape)


def _si(value: float) -> str:
    """thop's ``clever_format(..., "%.3f")``: 20212810000 -> '20.213G'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value > scale:
            return f"{value / scale:.3f}{suffix}"
    return f"{value:.3f}B"


# ----------------------------------------------------------------------------------------------------------
# python -m ssd_lightning.summary
# ----------------------------------------------------------------------------------------------------------
