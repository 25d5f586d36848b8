"""SSD300 (NVIDIA SSD300 v1.1): ResNet trunk, 5 extra feature blocks, per-feature-map loc/conf heads.

Module and state-dict key names are NVIDIA DeepLearningExamples' (``feature_extractor.feature_extractor.*``,
``additional_blocks.*``, ``loc.*``, ``conf.*``), so their checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from torch import nn

from ssd_lightning.boxes import DefaultBoxes, ssd300_default_boxes
from ssd_lightning.model.backbone import ResNet
from ssd_lightning.postprocess import postprocess

EXTRA_MID_CHANNELS = (256, 256, 128, 128, 128)


class SSD300(nn.Module):
    """SSD300 detector with NVIDIA v1.1's layout and default-box order.

    Args:
        backbone: ``resnet18 | resnet34 | resnet50 | resnet101 | resnet152``.
        num_classes: classes including the background (label 0); 81 for COCO.
        backbone_weights: None | ``"imagenet_v1"`` | ``"imagenet_v2"`` | path of a local torchvision ResNet
            ``state_dict`` (see :class:`~ssd_lightning.model.backbone.ResNet`; nothing is ever downloaded).

    Attributes:
        default_boxes: the 8732 SSD300 default boxes (:class:`~ssd_lightning.boxes.DefaultBoxes`, CPU tensors;
            a plain attribute, not in the state dict).
        num_classes, backbone_name: as given.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 81,
        backbone_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: need the background plus at least one class")
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.default_boxes: DefaultBoxes = ssd300_default_boxes()
        self.num_defaults = list(self.default_boxes.boxes_per_location)
        self.feature_extractor = ResNet(backbone, backbone_weights)
        channels = self.feature_extractor.out_channels
        self.additional_blocks = _extra_blocks(channels)
        self.loc = nn.ModuleList(_head(c, nd * 4) for c, nd in zip(channels, self.num_defaults, strict=True))
        self.conf = nn.ModuleList(
            _head(c, nd * num_classes) for c, nd in zip(channels, self.num_defaults, strict=True)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for part in (self.additional_blocks, self.loc, self.conf):
            for param in part.parameters():
                if param.dim() > 1:
                    nn.init.xavier_uniform_(param)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The 6 detection feature maps, 38, 19, 10, 5, 3 and 1 cells square for a 300x300 input."""
        x = self.feature_extractor(images)
        maps = [x]
        for block in self.additional_blocks:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw head outputs.

        Args:
            images: [N, 3, 300, 300], ImageNet-normalised (any memory format).
        Returns:
            locs [N, 4, 8732] box offsets (xywh coding against ``default_boxes``, scale 0.1/0.2) and
            confs [N, num_classes, 8732] class logits. Anchors are ordered (feature map, box size, row,
            column) as ``default_boxes``: channel c of head k is coordinate/class ``c // nd_k`` of box size
            ``c % nd_k``.
        """
        maps = self.features(images)
        locs = _bbox_view(maps, self.loc, 4)
        confs = _bbox_view(maps, self.conf, self.num_classes)
        return locs, confs

    @torch.no_grad()
    def detect(
        self,
        images: torch.Tensor,
        score_threshold: float = 0.05,
        iou_threshold: float = 0.5,
        max_detections: int = 200,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image (NVIDIA's evaluation decode); call ``eval()`` first.

        Args:
            images: [N, 3, 300, 300] as :meth:`forward`.
        Returns:
            one dict per image: ``boxes`` [K, 4] ltrb relative to the 300x300 input (not clipped), ``scores``
            [K], ``labels`` [K] int64 in 1..num_classes-1; sorted by score, K <= max_detections.
        """
        locs, confs = self(images)
        return postprocess(
            locs.float(),
            confs.float(),
            self._default_boxes_on(locs.device),
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            max_detections=max_detections,
        )

    def _default_boxes_on(self, device: torch.device) -> DefaultBoxes:
        boxes = self.default_boxes
        if boxes.xywh.device == device:
            return boxes
        return dataclasses.replace(boxes, xywh=boxes.xywh.to(device), ltrb=boxes.ltrb.to(device))


def _extra_blocks(channels: Sequence[int]) -> nn.ModuleList:
    """5 blocks, each Conv1x1-BN-ReLU-Conv3x3-BN-ReLU; the first 3 halve the map (stride 2, pad 1), the last 2
    shrink it by 2 (no padding): 38 -> 19 -> 10 -> 5 -> 3 -> 1."""
    blocks = []
    for i, mid in enumerate(EXTRA_MID_CHANNELS):
        c_in, c_out = channels[i], channels[i + 1]
        stride, padding = (2, 1) if i < 3 else (1, 0)
        blocks.append(
            nn.Sequential(
                nn.Conv2d(c_in, mid, kernel_size=1, bias=False),
                nn.BatchNorm2d(mid),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, c_out, kernel_size=3, padding=padding, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )
        )
    return nn.ModuleList(blocks)


def _head(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def _bbox_view(maps: list[torch.Tensor], heads: nn.ModuleList, size: int) -> torch.Tensor:
    """Head outputs [N, nd*size, H, W] concatenated as [N, size, sum(nd*H*W)] (reshape: channels_last ok)."""
    return torch.cat([head(x).reshape(x.shape[0], size, -1) for x, head in zip(maps, heads, strict=True)], 2)
