"""SSD post-processing: decode, per-class score filter, batched NMS, per-image top-k.

Gives NVIDIA SSD300 v1.1's detections (DeepLearningExamples ``Encoder.decode_batch(ploc, plabel, criteria=0.5,
max_output=200)``, reference section 3.3) for a whole batch at once on the tensors' device, with these
documented differences:

* The inputs are never modified (NVIDIA's ``scale_back_batch`` writes the decoded boxes into ``ploc``).
* Results are sorted by score, highest first (NVIDIA returns them lowest first).
* NMS suppresses a box whose IoU with a kept box of the same class is ``>= iou_threshold``, as NVIDIA's
  ``iou < criteria`` keep rule does (torchvision's ``nms`` alone would keep a box at exactly the threshold).
  The IoU is computed in float64 on the float32 boxes, so only IoUs within float32 rounding (~1e-7) of the
  threshold can be decided differently from NVIDIA's float32 IoU.
* Equal scores may be ordered differently (NVIDIA's unstable ascending sort vs. ``topk``/stable descending).
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from ssd_lightning.boxes import DefaultBoxes, decode_offsets


def _nms_threshold(iou_threshold: float) -> float:
    """The torchvision threshold that makes ``IoU > t`` mean NVIDIA's ``IoU >= iou_threshold``.

    torchvision suppresses ``IoU > t``; NVIDIA suppresses ``IoU >= criteria``. The largest float32 below the
    threshold turns one into the other for float32 IoUs, and it is a float32 number, so the CUDA kernel (which
    takes the threshold as float) and the CPU kernel (double) agree.
    """
    threshold = torch.tensor(iou_threshold, dtype=torch.float32)
    return torch.nextafter(threshold, torch.tensor(-float("inf"))).item()


def postprocess(
    locs: torch.Tensor,
    confs: torch.Tensor,
    default_boxes: DefaultBoxes,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 200,
    candidates_per_class: int = 200,
) -> list[dict[str, torch.Tensor]]:
    """Turn raw SSD outputs into detections, one dict per image.

    Per image and per class 1..C-1 (0 is background): softmax scores strictly above ``score_threshold``, the
    ``candidates_per_class`` best of them, greedy NMS at ``iou_threshold`` (suppressing IoU >= threshold) on
    the decoded, unclipped boxes; then the ``max_detections`` best over all classes.

    Args:
        locs: [N, 4, A] predicted offsets (NVIDIA layout), any float dtype; not modified.
        confs: [N, C, A] class logits; not modified.
        default_boxes: the A default boxes the offsets refer to.
        score_threshold: keep class scores ``> score_threshold``.
        iou_threshold: NMS IoU threshold (NVIDIA's ``criteria``; 0.5 in its evaluation).
        max_detections: detections kept per image (NVIDIA's ``max_output``).
        candidates_per_class: best-scoring boxes per image and class entering NMS (NVIDIA's ``max_num``).
    Returns:
        N dicts with ``boxes`` [K, 4] float32 ltrb relative to the network input (not clipped, may leave
        0..1), ``scores`` [K] float32 and ``labels`` [K] int64 in 1..C-1, sorted by score, highest first;
        K <= ``max_detections`` (K == 0 gives shapes [0, 4], [0], [0]).
    """
    num_images, num_classes, num_anchors = confs.shape
    with torch.autocast(device_type=locs.device.type, enabled=False):
        anchors = default_boxes.xywh.to(device=locs.device, dtype=torch.float32)
        # [N, A, 4] ltrb, unclipped
        boxes = decode_offsets(locs.float(), anchors, default_boxes.scale_xy, default_boxes.scale_wh)
        scores = confs.float().softmax(dim=1)[:, 1:, :]  # [N, C-1, A], background dropped

        # Per image and class, the best candidates above the threshold (filtering after top-k selects the
        # same boxes as NVIDIA's top-k after filtering).
        k = min(candidates_per_class, num_anchors)
        top_scores, top_anchors = scores.topk(k, dim=2)  # [N, C-1, k]
        image, cls, slot = (top_scores > score_threshold).nonzero(as_tuple=True)
        anchor = top_anchors[image, cls, slot]
        cand_scores = top_scores[image, cls, slot]
        cand_boxes = boxes[image, anchor]  # [M, 4]
        cand_labels = cls + 1

        # One NMS over every image and class: boxes only compete within the same (image, class) group. float64
        # (exact for float32 values) keeps the IoUs exact under batched_nms' coordinate offset trick.
        nms_dtype = torch.float32 if cand_boxes.device.type == "mps" else torch.float64
        groups = image * num_classes + cand_labels
        keep = batched_nms(
            cand_boxes.to(nms_dtype), cand_scores.to(nms_dtype), groups, _nms_threshold(iou_threshold)
        )  # sorted by decreasing score

        # Group by image (stable: each image stays sorted by score); keep each image's first max_detections.
        keep = keep[torch.sort(image[keep], stable=True).indices]
        kept_image = image[keep]
        counts = torch.bincount(kept_image, minlength=num_images)
        starts = counts.cumsum(0) - counts
        rank_in_image = torch.arange(keep.numel(), device=keep.device) - starts[kept_image]
        keep = keep[rank_in_image < max_detections]
        counts = counts.clamp(max=max_detections).tolist()

    per_image = zip(
        cand_boxes[keep].split(counts),
        cand_scores[keep].split(counts),
        cand_labels[keep].split(counts),
        strict=True,
    )
    return [{"boxes": b, "scores": s, "labels": lbl} for b, s, lbl in per_image]
