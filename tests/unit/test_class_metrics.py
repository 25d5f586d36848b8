"""Per-class AP from the COCO arrays (hand-counted), the per-class table, the precision-recall plot, and an
independent cross-check of our COCO numbers with torchmetrics' MeanAveragePrecision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision

from ssd_lightning.class_metrics import class_keys, format_class_table, metric_safe
from ssd_lightning.evaluation import BACKENDS, evaluate_coco, evaluate_detections
from ssd_lightning.pr_plot import write_pr_plot

# Four classes on two 100x100 images, each with a per-class AP known by hand:
#   perfect (id 3): its one box found exactly            -> AP = AP50 = 1
#   missed  (id 5): its one box, a detection elsewhere   -> AP = AP50 = 0
#   partial (id 7): 2 boxes; detections TP 0.9, FP 0.8, TP 0.7 -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
#       COCO's 101-point interpolated precision is 1 at the 51 recall points 0..0.50 and 2/3 at the 50 points
#       0.51..1.00: AP = (51 + 50 * 2/3) / 101 at every IoU threshold (the boxes match exactly).
#   absent  (id 9): no ground truth                      -> AP undefined (-1), 0 boxes
PARTIAL_AP = (51 + 50 * 2 / 3) / 101
CATEGORIES = [
    {"id": 3, "name": "perfect"},
    {"id": 5, "name": "missed"},
    {"id": 7, "name": "partial"},
    {"id": 9, "name": "absent"},
]
GT = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
    "categories": CATEGORIES,
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [40, 40, 30, 30]},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [10, 50, 20, 20]},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [50, 50, 20, 20]},
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [0, 0, 60, 60], "iscrowd": 1},  # not counted
    ],
}
DETECTIONS = [
    {"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.9},
    {"image_id": 1, "category_id": 5, "bbox": [0, 80, 15, 15], "score": 0.9},
    {"image_id": 1, "category_id": 7, "bbox": [10, 50, 20, 20], "score": 0.9},
    {"image_id": 2, "category_id": 7, "bbox": [80, 80, 15, 15], "score": 0.8},
    {"image_id": 2, "category_id": 7, "bbox": [50, 50, 20, 20], "score": 0.7},
]
EXPECTED = {
    "perfect": {"AP": 1.0, "AP50": 1.0, "num_gt": 1},
    "missed": {"AP": 0.0, "AP50": 0.0, "num_gt": 1},
    "partial": {"AP": PARTIAL_AP, "AP50": PARTIAL_AP, "num_gt": 2},
    "absent": {"AP": -1.0, "AP50": -1.0, "num_gt": 0},
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_class_ap_matches_the_hand_count(backend):
    result = evaluate_coco(GT, DETECTIONS, backend=backend)
    assert list(result.per_class) == ["perfect", "missed", "partial", "absent"]  # the file's order
    for name, expected in EXPECTED.items():
        assert result.per_class[name] == pytest.approx(expected, abs=1e-12), name
    # the overall AP is the mean over the classes with ground truth
    assert result.metrics["AP"] == pytest.approx((1 + 0 + PARTIAL_AP) / 3, abs=1e-12)
    assert result.precision.shape == (10, 101, 4)
    assert result.iou_thresholds[0] == pytest.approx(0.5) and result.iou_thresholds[5] == pytest.approx(0.75)
    assert evaluate_detections(GT, DETECTIONS, backend=backend) == result.metrics


def test_per_class_counts_only_the_evaluated_images():
    result = evaluate_coco(GT, DETECTIONS, image_ids=[2])
    assert result.per_class["partial"] == pytest.approx({"AP": 0.5, "AP50": 0.5, "num_gt": 1}, abs=1e-12)
    assert result.per_class["perfect"]["AP"] == -1.0 and result.per_class["perfect"]["num_gt"] == 0


def test_nothing_evaluated_gives_undefined_classes_and_no_plot(tmp_path):
    empty = {**GT, "images": [], "annotations": []}
    result = evaluate_coco(empty, [])
    assert result.precision is None
    assert result.per_class["partial"] == {"AP": -1.0, "AP50": -1.0, "num_gt": 0}
    assert write_pr_plot(result, tmp_path / "pr.png") is None and not (tmp_path / "pr.png").exists()


def test_class_keys_and_metric_names():
    cats = [{"id": 1, "name": "car"}, {"id": 2, "name": "car"}, {"id": 3, "name": "traffic light"}]
    assert class_keys(cats) == ["car (1)", "car (2)", "traffic light"]
    assert metric_safe("traffic light") == "traffic light"
    assert metric_safe("car/van (2)") == "car_van _2_"


def test_class_table_lists_the_weakest_class_first():
    table = format_class_table(evaluate_coco(GT, DETECTIONS).per_class).splitlines()
    assert table[0].split() == ["class", "AP", "AP50", "num_gt"]
    assert [line.split()[0] for line in table[1:]] == ["missed", "partial", "perfect", "absent"]
    assert table[2].split() == ["partial", f"{PARTIAL_AP:.3f}", f"{PARTIAL_AP:.3f}", "2"]
    assert table[4].split() == ["absent", "-", "-", "0"]


def test_precision_recall_plot_is_a_png_written_atomically(tmp_path):
    path = write_pr_plot(evaluate_coco(GT, DETECTIONS), tmp_path / "out" / "precision_recall.png")
    assert path == tmp_path / "out" / "precision_recall.png"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1200, 550)
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 50 and pixels.max() > 200  # something is drawn on a light background
    assert [p.name for p in path.parent.iterdir()] == ["precision_recall.png"]  # no temporary file left


def _random_set(seed: int, images: int = 12, classes: int = 3):
    """GT boxes and noisy detections (jittered matches, misses, false positives) for the cross-check."""
    g = torch.Generator().manual_seed(seed)
    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 10 + c, "name": f"c{c}"} for c in range(classes)],
    }
    rows, targets, preds = [], [], []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "width": 200, "height": 160})
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 120
        wh = 10 + torch.rand(n, 2, generator=g) * 30
        boxes = torch.cat([xy, wh], 1)
        labels = torch.randint(0, classes, (n,), generator=g)
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 10 + label,
                    "bbox": box,
                }
            )
        keep = torch.rand(n, generator=g) > 0.2  # some objects are missed
        det = boxes[keep] + torch.randn(int(keep.sum()), 4, generator=g) * 3
        det_labels = labels[keep]
        fp = torch.cat([torch.rand(2, 2, generator=g) * 120, 10 + torch.rand(2, 2, generator=g) * 30], 1)
        det = torch.cat([det, fp])
        det_labels = torch.cat([det_labels, torch.randint(0, classes, (2,), generator=g)])
        scores = torch.rand(det.shape[0], generator=g)
        for box, label, score in zip(det.tolist(), det_labels.tolist(), scores.tolist(), strict=True):
            rows.append({"image_id": image_id, "category_id": 10 + label, "bbox": box, "score": score})
        targets.append({"boxes": boxes, "labels": labels})
        preds.append({"boxes": det, "scores": scores, "labels": det_labels})
    return gt, rows, preds, targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_coco_ap_agrees_with_torchmetrics(backend):
    """torchmetrics builds its own COCO objects from tensors (its own conversion and bookkeeping, with
    ``pycocotools`` or ``faster_coco_eval`` underneath): our AP, AP50, AP75 and per-class AP agree with it."""
    gt, rows, preds, targets = _random_set(seed=0)
    ours = evaluate_coco(gt, rows, backend=backend)
    reference = MeanAveragePrecision(box_format="xywh", iou_type="bbox", class_metrics=True, backend=backend)
    reference.update(preds, targets)
    theirs = reference.compute()
    assert 0.1 < ours.metrics["AP"] < 0.9  # neither trivial nor perfect
    for name, key in (("AP", "map"), ("AP50", "map_50"), ("AP75", "map_75"), ("AR100", "mar_100")):
        assert ours.metrics[name] == pytest.approx(float(theirs[key]), abs=1e-4), name
    per_class = dict(zip(theirs["classes"].tolist(), theirs["map_per_class"].tolist(), strict=True))
    for c in range(3):
        assert ours.per_class[f"c{c}"]["AP"] == pytest.approx(per_class[c], abs=1e-4)
