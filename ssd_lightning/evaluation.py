"""COCO bbox evaluation (the official protocol), the 12-line AP table and atomic JSON outputs.

The flow, as NVIDIA SSD300 v1.1 evaluates (NVIDIA's ``PyTorch/Detection/SSD/ssd/evaluate.py``):

1. ``SSD300.detect`` gives per image ``boxes [K,4]`` (l, t, r, b relative to the 300x300 squashed input, not
   clipped), ``scores [K]`` and contiguous ``labels [K]`` (1..C-1).
2. :func:`detections_to_coco` turns them into COCO result rows: original image ids, original (dataset)
   category ids, ``bbox = [x, y, w, h]`` in original image pixels (exact because the resize is a squash).
3. :func:`merge_detections` joins the rows gathered from DDP ranks and drops padding duplicates.
4. :func:`evaluate_coco` (:func:`evaluate_detections`: its 12 numbers only) runs ``COCOeval(iouType="bbox")``
   (``evaluate``, ``accumulate``, ``summarize``) with faster-coco-eval (default) or pycocotools; both give
   the same 12 numbers (``COCOeval.stats``), and the per-class AP, AP50 and ground-truth counts are read off
   the same run's arrays (:mod:`ssd_lightning.class_metrics`).
5. :func:`format_table` prints them as pycocotools' ``summarize()`` does, character for character, and
   :func:`write_json_atomic` writes ``detections.json`` / ``metrics.json`` without ever leaving half a file.

Undefined metrics: COCO reports ``-1`` for a metric with no ground truth to measure it on (for example ``APs``
when no small object is annotated in the evaluated images, or every metric when no image is evaluated). This
module keeps that convention everywhere (returned dict, ``metrics.json``, table: ``= -1.000``) so the numbers
are the ones pycocotools users know; a metric is ``0.0`` when there is ground truth and no detection matched
it (for example with no detections at all). Consumers that average or compare metrics should treat negative
values as "undefined", not as a score.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ssd_lightning.class_metrics import CocoEvaluation, class_keys

__all__ = [
    "BACKENDS",
    "METRIC_NAMES",
    "CocoEvaluation",
    "detections_to_coco",
    "evaluate_coco",
    "evaluate_detections",
    "format_table",
    "load_annotations",
    "merge_detections",
]

#: The 12 COCO bbox metrics, in the order of ``COCOeval.stats``.
METRIC_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

#: Evaluation back ends; both implement the same protocol and agree to 1e-4 (tested).
BACKENDS: tuple[str, ...] = ("faster_coco_eval", "pycocotools")

# (title, type, IoU, area, maxDets) of each summarize() line, in METRIC_NAMES order.
_TABLE_ROWS: tuple[tuple[str, str, str, str, int], ...] = (
    ("Average Precision", "(AP)", "0.50:0.95", "all", 100),
    ("Average Precision", "(AP)", "0.50", "all", 100),
    ("Average Precision", "(AP)", "0.75", "all", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "small", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "medium", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "large", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 1),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 10),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "small", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "medium", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "large", 100),
)
# pycocotools' COCOeval.summarize() line format.
_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"


# ----------------------------------------------------------------------------------------------------------
# Model output -> COCO results rows
# ----------------------------------------------------------------------------------------------------------


def _dataset_ids(categories: Any) -> list[int]:
    """Dataset category ids of labels 1..C-1: ``categories.dataset_ids`` (a ``CategoryMap``) or a sequence."""
    ids = getattr(categories, "dataset_ids", categories)
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError) as e:
        raise TypeError(
            "categories must be a CategoryMap (with .dataset_ids) or a sequence of dataset category ids, "
            f"got {type(categories).__name__}"
        ) from e


def detections_to_coco(
    image_ids: torch.Tensor | Sequence[int],
    image_sizes: torch.Tensor | Sequence[Sequence[int]],
    detections: Sequence[Mapping[str, Any]],
    categories: Any,
    *,
    clip: bool = False,
) -> list[dict[str, Any]]:
    """Convert per-image detections to COCO results rows.

    Args:
        image_ids: [N] original COCO image ids.
        image_sizes: [N, 2] original image ``(height, width)`` in pixels.
        detections: N dicts as ``SSD300.detect`` returns them: ``boxes [K,4]`` (l, t, r, b relative to the
            300x300 squashed input, 0..1, may lie outside), ``scores [K]``, ``labels [K]`` (contiguous 1..C-1,
            0 is background). Tensors may live on any device and have any float dtype.
        categories: a ``CategoryMap`` (``.dataset_ids[i]`` is the dataset category id of label ``i+1``) or
            that list itself.
        clip: clip boxes to the image (``[0, W] x [0, H]``) before converting, as torchvision does. The
            default ``False`` is NVIDIA's behaviour (no clipping), which reproduces NVIDIA's AP with NVIDIA
            checkpoints; clipping can only raise the IoU of a box that sticks out of the image.

    Returns:
        One dict per detection, grouped by image in input order and in each image's order:
        ``{"image_id": int, "category_id": int (dataset id), "bbox": [x, y, w, h] (original pixels, float),
        "score": float}`` with ``x = l*W, y = t*H, w = (r-l)*W, h = (b-t)*H``.
    """
    n = len(detections)
    ids = torch.as_tensor(image_ids).detach().reshape(-1).cpu().to(torch.int64)
    sizes = torch.as_tensor(image_sizes).detach().reshape(-1, 2).cpu().to(torch.float64)
    if ids.numel() != n or sizes.shape[0] != n:
        raise ValueError(
            f"detections_to_coco: {n} detection dicts but {ids.numel()} image ids and {sizes.shape[0]} image "
            "sizes; pass one id and one (height, width) per image"
        )
    lut_ids = _dataset_ids(categories)
    if n == 0:
        return []
    counts = torch.tensor([int(torch.as_tensor(d["scores"]).numel()) for d in detections], dtype=torch.int64)
    if int(counts.sum()) == 0:
        return []

    def _cat(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.cat(
            [torch.as_tensor(d[key]).detach().to("cpu", dtype).reshape(shape) for d in detections]
        )

    boxes = _cat("boxes", torch.float64, (-1, 4))
    scores = _cat("scores", torch.float64, (-1,))
    labels = _cat("labels", torch.int64, (-1,))
    if boxes.shape[0] != scores.shape[0] or labels.shape[0] != scores.shape[0]:
        raise ValueError("detections_to_coco: each detection dict needs as many boxes and labels as scores")

    bad = (labels < 1) | (labels > len(lut_ids))
    if bool(bad.any()):
        raise ValueError(
            f"detections_to_coco: label {int(labels[bad][0])} is outside 1..{len(lut_ids)} (the category map "
            f"has {len(lut_ids)} classes; 0 is background): was the model built for another dataset?"
        )
    lut = torch.tensor([-1, *lut_ids], dtype=torch.int64)
    category_ids = lut[labels]

    if clip:
        boxes = boxes.clamp(0.0, 1.0)
    hw = sizes.repeat_interleave(counts, dim=0)  # [M, 2] (height, width) of each box's image
    wh = hw.flip(1)  # [M, 2] (width, height)
    xy = boxes[:, :2] * wh
    size = (boxes[:, 2:] - boxes[:, :2]) * wh
    bbox = torch.cat([xy, size], dim=1)

    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(
            ids.repeat_interleave(counts).tolist(),
            category_ids.tolist(),
            bbox.tolist(),
            scores.tolist(),
            strict=True,
        )
    ]


def merge_detections(rows_per_rank: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Concatenate the COCO result rows gathered from DDP ranks, dropping duplicates from sampler padding.

    A distributed sampler pads the dataset so that every rank gets the same number of images; the padding
    images are real images evaluated twice (on two ranks). Counting their detections twice would add false
    positives, so for each ``image_id`` only the rows of the *first* rank (in list order) that has rows for it
    are kept; the other ranks' rows for that image are dropped. Within one rank nothing is removed (one rank
    never sees the same image twice: the data module does not yield padding samples).

    An image that has no rows on one rank and rows on another keeps the latter's rows. Row order is kept:
    rank 0's rows first, then the kept rows of rank 1, and so on.
    """
    owner: dict[int, int] = {}
    merged: list[dict[str, Any]] = []
    for rank, rows in enumerate(rows_per_rank):
        for row in rows:
            image_id = int(row["image_id"])
            if owner.setdefault(image_id, rank) == rank:
                merged.append(dict(row))
    return merged


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def _silent(*args: Any, **kwargs: Any) -> None:
    """A ``print`` that prints nothing (faster-coco-eval's chatter)."""


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; use one of {', '.join(BACKENDS)}")


def _coco_class(backend: str) -> type:
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO  # lazy: only the chosen back end is loaded
    else:
        from pycocotools.coco import COCO  # lazy: only the chosen back end is loaded
    return COCO


def _quiet(backend: str) -> contextlib.AbstractContextManager:
    # pycocotools prints with print(): swallow stdout while it runs (process-wide, so prints of other threads
    # during those seconds are swallowed too). faster-coco-eval takes print functions instead.
    return contextlib.redirect_stdout(io.StringIO()) if backend == "pycocotools" else contextlib.nullcontext()


def _read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (check the path)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); rewrite or replace the file") from e


def _coco_from_dataset(dataset: dict, backend: str, source: str) -> Any:
    if not isinstance(dataset, dict) or not {"images", "annotations", "categories"} <= dataset.keys():
        raise ValueError(
            f"{source} is not a COCO annotation file: it needs 'images', 'annotations' and 'categories'"
        )
    for ann in dataset["annotations"]:
        missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
        if missing:
            raise ValueError(
                f"{source}: annotation {ann.get('id', '?')} lacks {', '.join(missing)}; COCO bbox evaluation "
                "needs image_id, category_id and bbox on every annotation"
            )
    dataset = complete_bbox_fields(dataset)
    coco_cls = _coco_class(backend)
    with _quiet(backend):
        coco = coco_cls() if backend == "pycocotools" else coco_cls(print_function=_silent)
        coco.dataset = dataset
        coco.createIndex()
    return coco


def complete_bbox_fields(dataset: dict) -> dict:
    """``dataset`` with what bbox-only exporters leave out filled in (a shallow copy; the input is not
    changed): ``area`` = box width x height (the usual bbox-only convention; COCO's own files give the mask
    area), ``iscrowd`` = 0, and an ``id`` for annotations without one. Returns ``dataset`` itself when
    nothing is missing."""
    annotations = dataset["annotations"]
    if all("area" in a and "iscrowd" in a and "id" in a for a in annotations):
        return dataset
    taken = {a["id"] for a in annotations if "id" in a}
    next_id = max((i for i in taken if isinstance(i, int)), default=0) + 1
    completed = []
    for ann in annotations:
        ann = dict(ann)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
        if "id" not in ann:
            ann["id"], next_id = next_id, next_id + 1
        completed.append(ann)
    return {**dataset, "annotations": completed}


def load_annotations(annotations: Any, backend: str = "faster_coco_eval") -> Any:
    """Load COCO ground truth as the ``COCO`` object of ``backend``.

    Args:
        annotations: path to a COCO instances JSON, its loaded dict, or a ``COCO`` object of either back end
            (reused as is when it is already the back end's class; rebuilt from its ``.dataset`` otherwise).
        backend: ``"faster_coco_eval"`` or ``"pycocotools"``.

    Load once and pass the object to :func:`evaluate_detections` to avoid re-reading the file every epoch;
    evaluation does not modify it.
    """
    _check_backend(backend)
    coco_cls = _coco_class(backend)
    if isinstance(annotations, coco_cls):
        return annotations
    if isinstance(annotations, (str, os.PathLike)):
        source = str(annotations)
        return _coco_from_dataset(_read_json(annotations, "COCO annotation file"), backend, source)
    if isinstance(annotations, dict):
        return _coco_from_dataset(annotations, backend, "the annotation dict")
    if hasattr(annotations, "dataset") and hasattr(annotations, "getImgIds"):
        return _coco_from_dataset(annotations.dataset, backend, "the COCO object's dataset")
    raise TypeError(
        f"annotations must be a path, a COCO dict or a COCO object, got {type(annotations).__name__}"
    )


def _result_rows(detections: Any) -> tuple[list[dict[str, Any]], str]:
    """Fresh copies of the results rows (the evaluators add keys to the dicts they get)."""
    if isinstance(detections, (str, os.PathLike)):
        source = str(detections)
        detections = _read_json(detections, "detections file")
    else:
        source = "the detections"
    if not isinstance(detections, list):
        raise ValueError(f"{source} must be a list of COCO result rows, got {type(detections).__name__}")
    try:
        rows = [
            {
                "image_id": r["image_id"],
                "category_id": r["category_id"],
                "bbox": r["bbox"],
                "score": r["score"],
            }
            for r in detections
        ]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{source}: every row needs image_id, category_id, bbox [x, y, w, h] and score (missing {e})"
        ) from e
    return rows, source


def _load_results(gt: Any, rows: list[dict[str, Any]], backend: str) -> Any:
    if rows:
        with _quiet(backend):
            return gt.loadRes(rows)
    # pycocotools' loadRes indexes rows[0] and crashes on an empty list: build the (empty) results by hand,
    # exactly as faster-coco-eval's loadRes does, so that both back ends evaluate "nothing detected".
    dataset = {
        "info": dict(gt.dataset.get("info", {})),
        "images": list(gt.dataset["images"]),
        "categories": [dict(c) for c in gt.dataset["categories"]],
        "annotations": [],
    }
    coco_cls = _coco_class(backend)
    with _quiet(backend):
        dt = coco_cls() if backend == "pycocotools" else coco_cls(print_function=_silent)
        dt.dataset = dataset
        dt.createIndex()
    return dt


def evaluate_detections(
    annotations: Any,
    detections: Any,
    image_ids: Iterable[int] | None = None,
    backend: str = "faster_coco_eval",
) -> dict[str, float]:
    """The 12 COCO metrics of :func:`evaluate_coco` (same arguments): ``evaluate_coco(...).metrics``."""
    return evaluate_coco(annotations, detections, image_ids, backend).metrics


def evaluate_coco(
    annotations: Any,
    detections: Any,
    image_ids: Iterable[int] | None = None,
    backend: str = "faster_coco_eval",
) -> CocoEvaluation:
    """Score COCO results with the official COCO bbox protocol (``COCOeval(iouType="bbox")``).

    Args:
        annotations: ground truth: path to a COCO instances JSON, its loaded dict, or a ``COCO`` object (see
            :func:`load_annotations`).
        detections: COCO results rows (``image_id``, ``category_id``, ``bbox`` xywh pixels, ``score``) as a
            list of dicts or the path of a results JSON. The caller's dicts are not modified.
        image_ids: evaluate on these images only (for example the images the validation pipeline covered);
            rows of other images are ignored. ``None``: every image of the annotation file, as NVIDIA does.
        backend: ``"faster_coco_eval"`` (default, C++ evaluate/accumulate) or ``"pycocotools"``; both give the
            same numbers to 1e-4.

    Returns:
        a :class:`~ssd_lightning.class_metrics.CocoEvaluation`: ``metrics`` is ``{name: value}`` for
        :data:`METRIC_NAMES`, in that order (``COCOeval.stats``), ``-1.0`` marking a metric without ground
        truth to measure it (COCO's convention, see the module docstring; with no detections at all, every
        defined metric is ``0.0``); ``per_class`` and ``precision`` are read off the same run's arrays. The
        evaluators' progress chatter is suppressed; print :func:`format_table` for the table.

    Raises:
        FileNotFoundError / ValueError: with one line naming the file, for a missing or malformed file, rows
            lacking keys, ``image_ids`` or rows that reference images absent from the annotations.
    """
    _check_backend(backend)
    gt = load_annotations(annotations, backend)
    rows, source = _result_rows(detections)
    gt_ids = set(gt.getImgIds())

    if image_ids is None:
        eval_ids = sorted(gt_ids)
    else:
        eval_ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(eval_ids) - gt_ids)
        if unknown:
            raise ValueError(
                f"{len(unknown)} of the image_ids to evaluate (e.g. {unknown[0]}) are not in the "
                "annotations; evaluate against the annotation file the images came from"
            )
        keep = set(eval_ids)
        rows = [r for r in rows if r["image_id"] in keep]
    unknown_rows = {r["image_id"] for r in rows} - gt_ids
    if unknown_rows:
        raise ValueError(
            f"{source}: {len(unknown_rows)} image ids (e.g. {min(unknown_rows)}) are not in the annotations; "
            "were the detections made on another dataset?"
        )
    categories = gt.dataset["categories"]
    if not eval_ids:
        undefined = {"AP": -1.0, "AP50": -1.0, "num_gt": 0}
        return CocoEvaluation(
            dict.fromkeys(METRIC_NAMES, -1.0), {k: dict(undefined) for k in class_keys(categories)}
        )

    dt = _load_results(gt, rows, backend)
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCOeval_faster  # lazy: only the chosen back end is loaded

        coco_eval = COCOeval_faster(gt, dt, iouType="bbox", print_function=_silent)
    else:
        from pycocotools.cocoeval import COCOeval  # lazy: only the chosen back end is loaded

        coco_eval = COCOeval(gt, dt, iouType="bbox")
    coco_eval.params.imgIds = eval_ids
    with _quiet(backend):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [float(v) for v in coco_eval.stats[: len(METRIC_NAMES)]]
    return CocoEvaluation.from_cocoeval(coco_eval, dict(zip(METRIC_NAMES, stats, strict=True)), categories)


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------


def format_table(metrics: Mapping[str, float] | Sequence[float]) -> str:
    """The 12-line table of pycocotools' ``COCOeval.summarize()``, character for character (no final newline).

    Args:
        metrics: ``{name: value}`` with every name of :data:`METRIC_NAMES` (extra keys are ignored), or the 12
            values in that order (``COCOeval.stats``).

    Example line: `` Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.250``.
    """
    if isinstance(metrics, Mapping):
        missing = [name for name in METRIC_NAMES if name not in metrics]
        if missing:
            raise ValueError(f"format_table: metrics lack {', '.join(missing)}")
        values = [float(metrics[name]) for name in METRIC_NAMES]
    else:
        values = [float(v) for v in metrics]
        if len(values) != len(METRIC_NAMES):
            raise ValueError(f"format_table: expected {len(METRIC_NAMES)} values, got {len(values)}")
    return "\n".join(_LINE.format(*row, value) for row, value in zip(_TABLE_ROWS, values, strict=True))
