"""Per-class COCO numbers read off the arrays of the one COCO evaluation run (no second evaluation).

``COCOeval.accumulate()`` leaves ``eval["precision"]`` of shape ``[T, R, K, A, M]``: T = 10 IoU thresholds
(0.50:0.05:0.95), R = 101 recall thresholds (0:0.01:1), K classes (``params.catIds`` order), A = 4 area ranges
(all, small, medium, large), M = 3 detection limits (1, 10, 100); ``-1`` where a class has no ground truth.
The summary's AP is the mean of ``precision[:, :, :, 0, 2]`` over its defined entries; the same mean taken
over one class gives that class's AP, over ``t = 0`` its AP50 (pycocotools' and faster-coco-eval's own rule).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CLASS_METRIC_NAMES",
    "CocoEvaluation",
    "class_keys",
    "count_ground_truth",
    "format_class_table",
    "metric_safe",
    "per_class_metrics",
]

#: What :func:`per_class_metrics` gives per class: AP@[.5:.95], AP@.5 and the number of ground-truth boxes.
CLASS_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "num_gt")

_AREA_ALL, _MAX_DETS_100 = 0, -1  # indices of area "all" and maxDets 100 in COCOeval's arrays


@dataclasses.dataclass(frozen=True)
class CocoEvaluation:
    """One COCO bbox evaluation: the 12 summary numbers, the per-class table and the curves behind them.

    Attributes:
        metrics: ``{name: value}`` of the 12 COCO metrics (``METRIC_NAMES`` order, ``-1``: undefined).
        per_class: ``{class key: {"AP": float, "AP50": float, "num_gt": int}}`` in the annotation file's
            category order (:func:`class_keys`); AP ``-1`` for a class without ground truth.
        precision: ``[T, R, K]`` interpolated precision at area "all", 100 detections (``-1``: undefined),
            or None when nothing was evaluated.
        iou_thresholds: the T IoU thresholds of ``precision``.
        recall_thresholds: the R recall thresholds of ``precision``.
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float | int]]
    precision: np.ndarray | None = None
    iou_thresholds: tuple[float, ...] = ()
    recall_thresholds: tuple[float, ...] = ()

    @classmethod
    def from_cocoeval(cls, coco_eval: Any, metrics: dict[str, float], categories: Sequence[Mapping]) -> Any:
        """Read the per-class numbers off a ``COCOeval`` (either back end) after ``accumulate()``."""
        params = coco_eval.params
        order = {int(c): k for k, c in enumerate(params.catIds)}
        precision = np.asarray(coco_eval.eval["precision"])[:, :, :, _AREA_ALL, _MAX_DETS_100]
        precision = precision[:, :, [order[int(c["id"])] for c in categories]]  # file's category order
        num_gt = count_ground_truth(coco_eval.cocoGt.dataset["annotations"], params.imgIds)
        counts = [num_gt.get(int(c["id"]), 0) for c in categories]
        return cls(
            metrics=metrics,
            per_class=per_class_metrics(precision, class_keys(categories), counts),
            precision=precision,
            iou_thresholds=tuple(float(t) for t in params.iouThrs),
            recall_thresholds=tuple(float(r) for r in params.recThrs),
        )


def class_keys(categories: Sequence[Mapping]) -> list[str]:
    """One key per category (``{"id", "name"}`` dicts): its name, or ``name (id)`` when two share a name."""
    names = [str(c.get("name", c["id"])) for c in categories]
    return [f"{n} ({c['id']})" if names.count(n) > 1 else n for n, c in zip(names, categories, strict=True)]


def count_ground_truth(annotations: Iterable[Mapping], image_ids: Iterable[int]) -> dict[int, int]:
    """``{category id: number of non-crowd boxes}`` over the evaluated images (what recall is measured on)."""
    keep = {int(i) for i in image_ids}
    counts: dict[int, int] = {}
    for ann in annotations:
        if int(ann["image_id"]) in keep and not ann.get("iscrowd", 0) and not ann.get("ignore", 0):
            counts[int(ann["category_id"])] = counts.get(int(ann["category_id"]), 0) + 1
    return counts


def metric_safe(name: str) -> str:
    """A class key as a logged metric's last part (``val/AP/<class>``): characters loggers refuse (MLflow
    allows ``[\\w .-/]``) and ``/`` (it would nest the name) become ``_``."""
    return re.sub(r"[^\w .-]", "_", name)


def _mean_defined(values: np.ndarray) -> float:
    """Mean of the entries > -1 (COCO's rule), -1 when there are none."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def per_class_metrics(
    precision: np.ndarray, keys: Sequence[str], num_gt: Sequence[int]
) -> dict[str, dict[str, float | int]]:
    """``{key: {"AP", "AP50", "num_gt"}}`` from ``precision [T, R, K]`` (area all, 100 detections; T starts at
    IoU 0.5) and the K ground-truth counts. AP is ``-1`` for a class without ground truth."""
    return {
        key: {
            "AP": _mean_defined(precision[:, :, k]),
            "AP50": _mean_defined(precision[0, :, k]),
            "num_gt": int(num_gt[k]),
        }
        for k, key in enumerate(keys)
    }


def format_class_table(per_class: Mapping[str, Mapping[str, float | int]]) -> str:
    """The per-class table printed under the 12 COCO lines, weakest AP first, classes without ground truth
    (``-``) last; no final newline. Columns: class, AP, AP50, num_gt."""
    width = max([len("class"), *(len(k) for k in per_class)])
    rows = sorted(per_class.items(), key=lambda kv: (float(kv[1]["AP"]) < 0, float(kv[1]["AP"])))
    lines = [f"{'class':<{width}}  {'AP':>6} {'AP50':>6} {'num_gt':>7}"]
    for key, m in rows:
        ap, ap50 = (f"{float(m[k]):6.3f}" if float(m[k]) >= 0 else f"{'-':>6}" for k in ("AP", "AP50"))
        lines.append(f"{key:<{width}}  {ap} {ap50} {int(m['num_gt']):>7d}")
    return "\n".join(lines)
