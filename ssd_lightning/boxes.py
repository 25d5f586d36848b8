"""SSD300 default boxes and the box math around them (pure functions, no nn.Modules).

Box formats used throughout the project (all coordinates relative to the 300x300 network input, 0..1):

* ``xywh``: (cx, cy, w, h), centre and extent, as NVIDIA's ``DefaultBoxes`` and DALI's ``box_encoder``
  emit them.
* ``ltrb``: (left, top, right, bottom), as torchvision's ``xyxy``.

The 8732 default boxes built here are the single source of truth for the model's anchor order, the loss, the
post-processing and the DALI ``box_encoder`` anchors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torchvision.ops import box_convert

FIG_SIZE = 300
FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
STEPS = (8, 16, 32, 64, 100, 300)
SCALES = (21, 45, 99, 153, 207, 261, 315)
ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
SCALE_XY = 0.1
SCALE_WH = 0.2
NUM_DEFAULT_BOXES = 8732


@dataclass(frozen=True)
class DefaultBoxes:
    """The SSD default boxes.

    Attributes:
        xywh: [A, 4] (cx, cy, w, h), clamped to [0, 1] component-wise as NVIDIA does.
        ltrb: [A, 4] (l, t, r, b) computed from the clamped ``xywh`` and *not* clamped (l/t reach -0.335,
            r/b 1.40); used for IoU matching and as DALI ``box_encoder`` anchors.
        scale_xy: centre-offset scale of the box coding (0.1).
        scale_wh: log-size scale of the box coding (0.2).
        boxes_per_location: default boxes per feature-map cell, per feature map ((4, 6, 6, 6, 4, 4)).
    """

    xywh: torch.Tensor
    ltrb: torch.Tensor
    scale_xy: float
    scale_wh: float
    boxes_per_location: tuple[int, ...]

    def __len__(self) -> int:
        return self.xywh.shape[0]

    def ltrb_list(self) -> list[float]:
        """Flattened ltrb anchors [A*4] as DALI's ``fn.box_encoder(anchors=...)`` takes them."""
        return self.ltrb.flatten().tolist()


def make_default_boxes(
    fig_size: int = FIG_SIZE,
    feature_sizes: tuple[int, ...] = FEATURE_SIZES,
    steps: tuple[int, ...] = STEPS,
    scales: tuple[int, ...] = SCALES,
    aspect_ratios: tuple[tuple[int, ...], ...] = ASPECT_RATIOS,
    scale_xy: float = SCALE_XY,
    scale_wh: float = SCALE_WH,
) -> DefaultBoxes:
    """Build the default boxes in NVIDIA SSD300 v1.1 order: per feature map, per box size, row i, column j.

    The defaults give the 8732 SSD300 COCO boxes (``dboxes300_coco``). ``fig_size / step`` (not the feature
    size) is the cell count used for centres, per the Caffe convention.
    """
    boxes: list[tuple[float, float, float, float]] = []
    per_location: list[int] = []
    for k, size in enumerate(feature_sizes):
        cells = fig_size / steps[k]
        small = scales[k] / fig_size
        large = scales[k + 1] / fig_size
        shapes = [(small, small), (math.sqrt(small * large),) * 2]
        for alpha in aspect_ratios[k]:
            w, h = small * math.sqrt(alpha), small / math.sqrt(alpha)
            shapes += [(w, h), (h, w)]
        per_location.append(len(shapes))
        for w, h in shapes:
            for i, j in itertools.product(range(size), repeat=2):
                boxes.append(((j + 0.5) / cells, (i + 0.5) / cells, w, h))
    xywh = torch.tensor(boxes, dtype=torch.float32, device="cpu").clamp_(0, 1)
    ltrb = box_convert(xywh, "cxcywh", "xyxy")
    return DefaultBoxes(xywh, ltrb, scale_xy, scale_wh, tuple(per_location))


_SSD300_BOXES: DefaultBoxes | None = None


def ssd300_default_boxes() -> DefaultBoxes:
    """The 8732 SSD300 COCO default boxes (built once, shared; treat the tensors as read-only)."""
    global _SSD300_BOXES
    if _SSD300_BOXES is None:
        _SSD300_BOXES = make_default_boxes()
    return _SSD300_BOXES


def encode_offsets(
    boxes_xywh: torch.Tensor,
    anchors_xywh: torch.Tensor,
    scale_xy: float = SCALE_XY,
    scale_wh: float = SCALE_WH,
) -> torch.Tensor:
    """Regression targets of boxes against anchors (NVIDIA's ``Loss._loc_vec``).

    Args:
        boxes_xywh: [..., 4, A] target boxes, xywh relative.
        anchors_xywh: [4, A] (or broadcastable) default boxes, xywh relative.
    Returns:
        [..., 4, A] offsets ``((c - c_a) / wh_a / scale_xy, log(wh / wh_a) / scale_wh)``.
    """
    xy = (boxes_xywh[..., :2, :] - anchors_xywh[..., :2, :]) / anchors_xywh[..., 2:, :] / scale_xy
    wh = torch.log(boxes_xywh[..., 2:, :] / anchors_xywh[..., 2:, :]) / scale_wh
    return torch.cat((xy, wh), dim=-2)


def decode_boxes(
    offsets: torch.Tensor, anchors_xywh: torch.Tensor, scale_xy: float = SCALE_XY, scale_wh: float = SCALE_WH
) -> torch.Tensor:
    """Inverse of :func:`encode_offsets` for boxes in rows: [..., 4] offsets and their [..., 4] (or
    broadcastable) xywh anchors give [..., 4] ltrb boxes, not clipped (NVIDIA's ``scale_back_batch``
    arithmetic, in the same order)."""
    xy = offsets[..., :2] * scale_xy * anchors_xywh[..., 2:] + anchors_xywh[..., :2]
    wh = torch.exp(offsets[..., 2:] * scale_wh) * anchors_xywh[..., 2:]
    return box_convert(torch.cat((xy, wh), dim=-1), "cxcywh", "xyxy")


def decode_offsets(
    locs: torch.Tensor, anchors_xywh: torch.Tensor, scale_xy: float = SCALE_XY, scale_wh: float = SCALE_WH
) -> torch.Tensor:
    """Inverse of :func:`encode_offsets`, returning ltrb boxes (NVIDIA's ``scale_back_batch``).

    Args:
        locs: [N, 4, A] predicted offsets in NVIDIA's layout.
        anchors_xywh: [A, 4] default boxes, xywh relative.
    Returns:
        [N, A, 4] boxes, ltrb relative to the 300x300 input, not clipped. ``locs`` is left unchanged.
    """
    return decode_boxes(locs.permute(0, 2, 1), anchors_xywh, scale_xy, scale_wh)
