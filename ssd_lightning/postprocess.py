"""SSD post-processing: decode, per-class score filter, greedy NMS, per-image top-k, for a whole batch.

Gives NVIDIA SSD300 v1.1's detections (DeepLearningExamples ``Encoder.decode_batch(ploc, plabel, criteria=0.5,
max_output=200)``, NVIDIA's ``PyTorch/Detection/SSD/ssd/utils.py``): per image and class, the scores above
0.05, the best 200, greedy NMS suppressing ``IoU >= 0.5`` with NVIDIA's float32 ``calc_iou_tensor``
arithmetic; then the best 200 of the image. The same float32 operations give the same bits, so the detections
are NVIDIA's (tested bit for bit).

Differences, all documented:

* The inputs are never modified (NVIDIA's ``scale_back_batch`` writes the decoded boxes into ``ploc``).
* Results are sorted by score, highest first (NVIDIA returns them lowest first); equal scores may be ordered
  differently (NVIDIA's sorts are unstable).
* With ``nms_method`` ``kernel`` or ``hybrid`` (the CPU default), a NaN IoU (a box of zero or infinite area)
  does not suppress in torchvision's kernel; NVIDIA's ``iou < criteria`` filter drops such a box.

NVIDIA loops over images, then classes, then a Python ``while`` loop of NMS. Here the work is a fixed number
of tensor operations for the whole batch, on the tensors' device:

1. The class maximum of every anchor's logits tells which anchors can have a score above the threshold
   (``p_c > t`` needs ``x_c > max x + ln t``); only those rows are soft-maxed, in NVIDIA's [N, A, C] layout.
2. The candidates are sorted by (image, class, score) and cut to the best ``candidates_per_class`` per class.
3. Each (image, class) group with a candidate becomes a row of a [G, K] table, rows sorted by size; only
   the candidates' boxes are decoded.
4. Exact greedy NMS for all groups at once (:func:`greedy_nms_padded`; on the CPU the widest groups go
   through torchvision's C++ kernel one by one).
5. One ``topk`` per image for the best ``max_detections``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)

from ssd_lightning.boxes import DefaultBoxes, decode_boxes

__all__ = ["NMS_METHODS", "POSTPROCESS_NMS_METHODS", "greedy_nms_padded", "postprocess", "suppression_matrix"]

#: NMS scan methods of :func:`greedy_nms_padded`.
NMS_METHODS: tuple[str, ...] = ("auto", "sequential", "fixed_point")
#: ``nms_method`` of :func:`postprocess`: those of :func:`greedy_nms_padded`, plus ``kernel`` (each group
#: through torchvision's C++/CUDA NMS kernel, one call per (image, class) group: the unbatched baseline) and
#: ``hybrid`` (groups wider than ``_KERNEL_MIN_WIDTH`` through the kernel, the others ``sequential``; the CPU
#: default). The kernel computes the IoU with the same float32 operations and suppresses ``IoU >=
#: iou_threshold`` too (the threshold is passed as the float32 just below it).
POSTPROCESS_NMS_METHODS: tuple[str, ...] = (*NMS_METHODS, "kernel", "hybrid")
_KERNEL_MIN_WIDTH = 32


def _nms_threshold(iou_threshold: float) -> float:
    """The torchvision threshold that makes ``IoU > t`` mean NVIDIA's ``IoU >= iou_threshold``.

    torchvision suppresses ``IoU > t``; NVIDIA suppresses ``IoU >= criteria``. The largest float32 below the
    threshold turns one into the other for float32 IoUs, and it is a float32 number, so the CUDA kernel (which
    takes the threshold as float) and the CPU kernel (double) agree.
    """
    threshold = torch.tensor(iou_threshold, dtype=torch.float32)
    return torch.nextafter(threshold, torch.tensor(-float("inf"))).item()


def suppression_matrix(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Which box suppresses which, within each group of score-sorted boxes.

    Args:
        boxes: [G, K, 4] float32 ltrb boxes, each group sorted by decreasing score.
        iou_threshold: NVIDIA's ``criteria``.
    Returns:
        [G, K, K] bool, ``S[g, i, j]`` true when ``j > i`` and NOT ``IoU(box_i, box_j) < iou_threshold``,
        the IoU computed with the operations of NVIDIA's ``calc_iou_tensor`` in float32 (so the same bits; a
        NaN IoU suppresses, as NVIDIA's ``ious < criteria`` filter drops it).
    """
    left, top, right, bottom = boxes.permute(2, 0, 1).contiguous()  # [G, K] each
    # intersection width / height: min(r) - max(l), negative -> 0 (NVIDIA: delta[delta < 0] = 0; NaN stays)
    inter = torch.minimum(right[:, :, None], right[:, None, :])
    inter -= torch.maximum(left[:, :, None], left[:, None, :])
    inter.clamp_(min=0)
    height = torch.minimum(bottom[:, :, None], bottom[:, None, :])
    height -= torch.maximum(top[:, :, None], top[:, None, :])
    inter *= height.clamp_(min=0)
    area = (right - left) * (bottom - top)
    union = torch.add(area[:, :, None], area[:, None, :], out=height)  # a_i + a_j == a_j + a_i exactly
    union -= inter
    keep_pair = inter.div_(union) < iou_threshold
    k = boxes.shape[1]
    later = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu_(diagonal=1)
    return keep_pair.logical_not_().logical_and_(later)


def greedy_nms_padded(
    suppress: torch.Tensor,
    valid: torch.Tensor,
    method: str = "auto",
    sizes: list[int] | None = None,
) -> torch.Tensor:
    """Greedy NMS over padded groups of score-sorted boxes.

    Box ``j`` of a group is kept when it is valid and no kept box ``i < j`` suppresses it
    (``suppress[g, i, j]``); box 0 of a group, if valid, is always kept. This is the greedy algorithm (take
    the best remaining box, drop what it suppresses, repeat) written as a triangular system; its solution
    is unique, so both methods below give exactly the greedy result.

    Args:
        suppress: [G, K, K] bool, false on and below the diagonal (see :func:`suppression_matrix`).
        valid: [G, K] bool, the real boxes (padding: false; padding never suppresses).
        method: ``sequential`` (K - 1 steps, each O(G*K) vectorised over the groups; no host
            synchronisation; best on CPU), ``fixed_point`` (Jacobi iteration ``keep = valid &
            ~any_i(keep_i & S_ij)`` until nothing changes: one batched matrix-vector product and one host
            check per iteration, as many iterations as the longest suppression chain plus one; best on GPU) or
            ``auto`` (``fixed_point`` on CUDA, else ``sequential``).
        sizes: optional valid-box count of each group, in decreasing order (the groups sorted so): the
            ``sequential`` scan then only touches the groups that still have boxes at each step.
    Returns:
        [G, K] bool, the kept boxes.
    """
    if method == "auto":
        method = "fixed_point" if suppress.device.type == "cuda" else "sequential"
    if method not in NMS_METHODS:
        raise ValueError(f"unknown NMS method {method!r}; use one of {', '.join(NMS_METHODS)}")
    num_groups, k = valid.shape
    if num_groups == 0 or k == 0:
        return valid.clone()
    suppress = suppress & valid[:, :, None]  # padding never suppresses
    if method == "sequential":
        keep = valid.clone()
        active = num_groups
        for i in range(k - 1):
            if sizes is not None:
                while active > 0 and sizes[active - 1] <= i + 1:
                    active -= 1  # no box after i in these groups
                if active == 0:
                    break
            # keep[:, i] is final here: only boxes before i can suppress box i
            keep[:active, i + 1 :] &= ~(suppress[:active, i, i + 1 :] & keep[:active, i : i + 1])
        return keep
    # 0/1 products summed over at most K terms: exact in float16 (K <= 2048) and float32
    dtype = torch.float16 if suppress.device.type == "cuda" and k <= 2048 else torch.float32
    matrix = suppress.to(dtype)
    keep = valid
    for _ in range(k + 1):
        suppressed = torch.bmm(keep.to(dtype)[:, None, :], matrix)[:, 0, :] > 0
        new = valid & ~suppressed
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def _pair_budget(device: torch.device) -> int:
    # float32 IoU temporaries per chunk: a few [chunk, K, K] tensors
    return 2**24 if device.type == "cuda" else 2**21


def postprocess(
    locs: torch.Tensor,
    confs: torch.Tensor,
    default_boxes: DefaultBoxes,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 200,
    candidates_per_class: int = 200,
    *,
    nms_method: str = "auto",
    max_pairs: int | None = None,
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
        nms_method: one of :data:`POSTPROCESS_NMS_METHODS`; ``auto``: ``fixed_point`` on CUDA, else
            ``hybrid``. Every method gives the same detections (up to the NaN note of the module).
        max_pairs: box pairs per chunk of the IoU computation (memory bound; default 2**24 on CUDA, 2**21
            elsewhere).
    Returns:
        N dicts with ``boxes`` [K, 4] float32 ltrb relative to the network input (not clipped, may leave
        0..1), ``scores`` [K] float32 and ``labels`` [K] int64 in 1..C-1, sorted by score, highest first;
        K <= ``max_detections`` (K == 0 gives shapes [0, 4], [0], [0]).

    Host synchronisations: three data-dependent sizes (anchor rows and candidates above the threshold,
    candidates per group), the per-image counts at the end (the result is a list of variable-length
    tensors), and the convergence checks of ``fixed_point``.
    """
    if nms_method not in POSTPROCESS_NMS_METHODS:
        raise ValueError(f"nms_method={nms_method!r}: use one of {', '.join(POSTPROCESS_NMS_METHODS)}")
    num_images = confs.shape[0]
    device = locs.device
    with torch.autocast(device_type=device.type, enabled=False):
        image, anchor, cls, score = _candidates(confs, score_threshold)
        if score.numel() == 0 or max_detections <= 0:
            return [_empty(device) for _ in range(num_images)]
        table = _pack_groups(
            image, anchor, cls, score, locs, default_boxes, confs.shape[1], candidates_per_class
        )
        keep = _nms(table, iou_threshold, nms_method, max_pairs)
        return _best_per_image(table, keep, num_images, max_detections)


def _candidates(
    confs: torch.Tensor, score_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (image, anchor, class slot) whose softmax score is above the threshold, and the score.

    The softmax is NVIDIA's: over the classes of each anchor's row of [N, A, C] in float32, computed only for
    the rows that can pass (rows are independent, so each gets NVIDIA's bits).
    Returns [M] tensors: image, anchor, class slot (0-based, background excluded), score (float32), ordered
    by (image, anchor, class).
    """
    num_images, num_classes, num_anchors = confs.shape
    device = confs.device
    logits = confs.float().permute(0, 2, 1)  # [N, A, C], NVIDIA's layout
    if score_threshold > 0:
        # p_c > t needs x_c > max_j x_j + ln t (the softmax denominator is at least exp(max - max) = 1)
        margin = -math.log(score_threshold) + 1e-3  # slack >> float32 rounding of the softmax
        best_class = confs[:, 1:].float().amax(dim=1)  # [N, A]
        best = torch.maximum(best_class, confs[:, 0].float())
        row_image, row_anchor = (best_class > best - margin).nonzero(as_tuple=True)  # host sync
    else:
        row_image = torch.arange(num_images, device=device).repeat_interleave(num_anchors)
        row_anchor = torch.arange(num_anchors, device=device).repeat(num_images)
    probs = logits[row_image, row_anchor].softmax(dim=-1)[:, 1:]  # [R, C-1]
    row, cls = (probs > score_threshold).nonzero(as_tuple=True)  # host sync
    return row_image[row], row_anchor[row], cls, probs[row, cls]


@dataclass
class _GroupTable:
    """Candidates packed as [G, K] rows, one per (image, class) group that has one, best first in a row.

    Rows are sorted by candidate count, decreasing (``sizes``, on the host). Padding: score -inf, box zeros.
    """

    scores: torch.Tensor  # [G, K] float32
    boxes: torch.Tensor  # [G, K, 4] float32 ltrb
    image: torch.Tensor  # [G] image of each row
    slot: torch.Tensor  # [G] 0-based class slot of each row (label - 1)
    row_of_group: torch.Tensor  # [N * (C-1)] row of each (image, class slot) group
    sizes: list[int]  # [G] candidates per row
    classes: int  # C - 1

    @property
    def width(self) -> int:
        return self.scores.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        return self.scores > -math.inf


def _pack_groups(
    image: torch.Tensor,
    anchor: torch.Tensor,
    slot: torch.Tensor,
    score: torch.Tensor,
    locs: torch.Tensor,
    default_boxes: DefaultBoxes,
    num_classes: int,
    candidates_per_class: int,
) -> _GroupTable:
    """The best ``candidates_per_class`` candidates of every group as a :class:`_GroupTable`; only their
    boxes are decoded. Inputs: the [M] tensors of :func:`_candidates` and the [N, 4, A] offsets."""
    num_images, _, num_anchors = locs.shape
    classes = num_classes - 1
    device = score.device
    group = image * classes + slot
    # by (group, score descending); ties keep the anchor order (two stable sorts, no float64 key: MPS)
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    score, anchor, group = score[order], anchor[order], group[order]
    counts = torch.bincount(group, minlength=num_images * classes)
    rank = torch.arange(group.numel(), device=device) - (counts.cumsum(0) - counts)[group]
    k = min(int(candidates_per_class), num_anchors)

    counts_host = counts.clamp(max=k).cpu()  # host sync
    num_groups = int((counts_host > 0).sum())
    group_order = torch.argsort(counts_host, descending=True, stable=True)[:num_groups]
    sizes = counts_host[group_order].tolist()
    groups = group_order.to(device)  # [G] group id of each row
    row_of_group = torch.zeros(num_images * classes, dtype=torch.long, device=device)
    row_of_group[groups] = torch.arange(num_groups, device=device)
    take = (rank < k).nonzero().squeeze(1)
    row, column, anchor = row_of_group[group[take]], rank[take], anchor[take]
    scores = torch.full((num_groups, sizes[0]), -math.inf, device=device)
    scores[row, column] = score[take]
    g_image = torch.div(groups, classes, rounding_mode="floor")

    anchors = default_boxes.xywh.to(device=device, dtype=torch.float32)
    boxes = torch.zeros(num_groups, sizes[0], 4, device=device)
    boxes[row, column] = decode_boxes(
        locs[g_image[row], :, anchor].float(), anchors[anchor], default_boxes.scale_xy, default_boxes.scale_wh
    )
    return _GroupTable(scores, boxes, g_image, groups - g_image * classes, row_of_group, sizes, classes)


def _nms(table: _GroupTable, iou_threshold: float, method: str, max_pairs: int | None) -> torch.Tensor:
    """Greedy NMS of every group of ``table``: [G, K] bool, the kept boxes.

    On the CPU (``hybrid``) the widest groups go one by one through torchvision's C++ greedy kernel (cheap
    per call, and it skips suppressed boxes); the rest, and on GPUs every group, by buckets of rows of
    similar width (at most ``max_pairs`` box pairs, widths within 2x) through :func:`greedy_nms_padded`.
    """
    device = table.scores.device
    sizes, num_groups = table.sizes, len(table.sizes)
    if method == "auto":
        method = "fixed_point" if device.type == "cuda" else "hybrid"
    keep = torch.zeros(num_groups, table.width, dtype=torch.bool, device=device)
    start = 0
    if method in ("hybrid", "kernel"):
        wide = num_groups if method == "kernel" else sum(1 for n in sizes if n > _KERNEL_MIN_WIDTH)
        threshold = _nms_threshold(iou_threshold)  # torchvision drops IoU > t; NVIDIA IoU >= criteria
        nms = torch.ops.torchvision.nms
        kept = [nms(table.boxes[g, : sizes[g]], table.scores[g, : sizes[g]], threshold) for g in range(wide)]
        if kept:
            lengths = torch.tensor([len(k) for k in kept], device=device)
            keep[torch.arange(wide, device=device).repeat_interleave(lengths), torch.cat(kept)] = True
        start = wide
        method = "sequential"
    budget = int(max_pairs) if max_pairs else _pair_budget(device)
    valid = table.valid
    while start < num_groups:
        w = sizes[start]
        stop = start + 1
        limit = start + max(1, budget // (w * w))
        while stop < min(num_groups, limit) and 2 * sizes[stop] > w:
            stop += 1
        keep[start:stop, :w] = greedy_nms_padded(
            suppression_matrix(table.boxes[start:stop, :w], iou_threshold),
            valid[start:stop, :w],
            method,
            sizes[start:stop],
        )
        start = stop
    return keep


def _best_per_image(
    table: _GroupTable, keep: torch.Tensor, num_images: int, max_detections: int
) -> list[dict[str, torch.Tensor]]:
    """The best ``max_detections`` kept boxes of each image (see :func:`postprocess` for the dicts)."""
    device = keep.device
    width = table.width
    # the kept scores go to a dense [N, (C-1) * K] table (column = class slot * K + rank in the class), one
    # topk per row
    dense = torch.full((num_images, table.classes * width), -math.inf, device=device)
    column = table.slot[:, None] * width + torch.arange(width, device=device)
    dense.index_put_(
        (table.image[:, None].expand_as(column), column), torch.where(keep, table.scores, -math.inf)
    )
    best_scores, best_column = dense.topk(min(int(max_detections), table.classes * width), dim=1)  # sorted
    slot = torch.div(best_column, width, rounding_mode="floor")
    image = torch.arange(num_images, device=device)[:, None]
    found = best_scores > -math.inf
    best_row = torch.where(found, table.row_of_group[image * table.classes + slot], 0)
    best_boxes = table.boxes[best_row, best_column - slot * width]  # [N, D, 4]
    labels = slot + 1
    per_image = found.sum(dim=1).tolist()  # host sync
    return [
        {"boxes": best_boxes[n, :m], "scores": best_scores[n, :m], "labels": labels[n, :m]}
        for n, m in enumerate(per_image)
    ]


def _empty(device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros(0, 4, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
    }
