"""SSD MultiBox loss: smooth-L1 box regression on positives plus cross-entropy with hard negative mining.

Reproduces NVIDIA SSD300 v1.1's ``Loss`` (DeepLearningExamples ``PyTorch/Detection/SSD/ssd/model.py``)
value for value.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssd_lightning.boxes import DefaultBoxes, encode_offsets, ssd300_default_boxes


class LossParts(NamedTuple):
    """The loss and its two parts (0-dim float32 tensors); ``total == box + cls``.

    Each part is the batch mean of per-image sums divided by that image's positive-anchor count; an image with
    no positive anchor contributes 0 to both parts but still counts in the mean.
    """

    total: torch.Tensor
    box: torch.Tensor
    cls: torch.Tensor


class MultiBoxLoss(nn.Module):
    """SSD loss with NVIDIA's normalisation, always computed in float32.

    Args:
        default_boxes: the anchors the targets were matched against; ``None``: the 8732 SSD300 COCO boxes.
        neg_pos_ratio: hard negatives kept per positive anchor (3:1 in SSD), capped at the anchor count.

    Per image ``n`` with ``P_n`` positive anchors (``target_labels > 0``):

    * box part: smooth-L1 (beta 1) of ``locs - encode_offsets(target_boxes, anchors)``, summed over the
      positives and the 4 coordinates;
    * class part: cross-entropy summed over the positives and the ``min(ratio * P_n, A)`` negatives with the
      highest cross-entropy (positives are never picked as negatives);

    each divided by ``P_n`` (0 when ``P_n == 0``), then averaged over the batch.
    """

    anchors: torch.Tensor

    def __init__(self, default_boxes: DefaultBoxes | None = None, neg_pos_ratio: float = 3.0) -> None:
        super().__init__()
        boxes = default_boxes if default_boxes is not None else ssd300_default_boxes()
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.scale_xy = boxes.scale_xy
        self.scale_wh = boxes.scale_wh
        # [1, 4, A] xywh. Not persistent: the anchors follow .to(device) but are not written to checkpoints.
        self.register_buffer("anchors", boxes.xywh.t().unsqueeze(0).clone(), persistent=False)

    def forward(
        self,
        locs: torch.Tensor,
        confs: torch.Tensor,
        target_boxes: torch.Tensor,
        target_labels: torch.Tensor,
    ) -> torch.Tensor:
        """The total loss (0-dim float32 tensor); arguments as in :meth:`components`."""
        return self.components(locs, confs, target_boxes, target_labels).total

    def components(
        self,
        locs: torch.Tensor,
        confs: torch.Tensor,
        target_boxes: torch.Tensor,
        target_labels: torch.Tensor,
    ) -> LossParts:
        """Loss and its box/class parts.

        Args:
            locs: [N, 4, A] predicted offsets (any float dtype).
            confs: [N, C, A] class logits, class 0 is background.
            target_boxes: [N, 4, A] matched boxes, xywh relative (DALI ``box_encoder`` output [N, A, 4]
                transposed); unmatched anchors hold the anchor box itself.
            target_labels: [N, A] int64 matched labels, 0 for background.
        Returns:
            :class:`LossParts` of 0-dim float32 tensors.
        """
        num_anchors = self.anchors.shape[-1]
        if locs.shape[-1] != num_anchors or confs.shape[-1] != num_anchors:
            raise ValueError(
                f"MultiBoxLoss was built for {num_anchors} default boxes but got locs {tuple(locs.shape)} "
                f"and confs {tuple(confs.shape)}; pass the model's default_boxes to MultiBoxLoss"
            )
        with torch.autocast(device_type=locs.device.type, enabled=False):
            return self._components(locs.float(), confs.float(), target_boxes.float(), target_labels.long())

    def _components(
        self, locs: torch.Tensor, confs: torch.Tensor, target_boxes: torch.Tensor, target_labels: torch.Tensor
    ) -> LossParts:
        positive = target_labels > 0  # [N, A]
        num_pos = positive.sum(dim=1)  # [N]

        # Box regression, positives only, summed over the 4 coordinates and the anchors.
        anchors = self.anchors.float()  # float32 math even if the module was cast to half ("16-true")
        target_offsets = encode_offsets(target_boxes, anchors, self.scale_xy, self.scale_wh)
        box_loss = F.smooth_l1_loss(locs, target_offsets, reduction="none", beta=1.0).sum(dim=1)  # [N, A]
        # where (not NVIDIA's multiply by the mask): the same value, but non-finite targets at non-positive
        # anchors cannot turn the sum into NaN.
        box_per_image = torch.where(positive, box_loss, 0.0).sum(dim=1)  # [N]

        # Classification with hard negative mining: rank each image's negatives by their cross-entropy.
        ce = F.cross_entropy(confs, target_labels, reduction="none")  # [N, A]
        neg_ce = torch.where(positive, 0.0, ce)  # positives are never selected as negatives
        order = neg_ce.argsort(dim=1, descending=True)
        # rank[n, a]: position of anchor a in that order (the inverse permutation; NVIDIA sorts twice).
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(ce.shape[1], device=ce.device).expand_as(order)
        )
        num_neg = (self.neg_pos_ratio * num_pos).clamp(max=ce.shape[1]).unsqueeze(1)  # [N, 1]
        selected = positive | (rank < num_neg)
        cls_per_image = torch.where(selected, ce, 0.0).sum(dim=1)  # [N]

        # Per-image normalisation by the positive count; images without positives give exactly 0 (both sums
        # are empty: no positive, and 0 negatives selected) and still count in the batch mean.
        denominator = num_pos.clamp(min=1).float()
        box = (box_per_image / denominator).mean()
        cls = (cls_per_image / denominator).mean()
        return LossParts(box + cls, box, cls)
