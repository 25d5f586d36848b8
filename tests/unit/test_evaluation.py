"""COCO evaluation: result rows, the official protocol on hand-checked cases, both back ends, table, JSON."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssd_lightning.evaluation import (
    BACKENDS,
    METRIC_NAMES,
    complete_bbox_fields,
    detections_to_coco,
    evaluate_detections,
    format_table,
    load_annotations,
    merge_detections,
)
from ssd_lightning.fileio import write_json_atomic

# ----------------------------------------------------------------------------------------------------------
# A hand-made COCO ground truth: images of different sizes, non-contiguous category ids, a crowd region, an
# image without annotations, a category without annotations, and small / medium / large objects (COCO areas:
# small < 32**2 = 1024 <= medium < 96**2 = 9216 <= large). At most one non-crowd object per (image, category),
# so that perfect detections also give AR@1 = 1.
# ----------------------------------------------------------------------------------------------------------

CATEGORIES = [
    {"id": 2, "name": "cat"},
    {"id": 5, "name": "dog"},
    {"id": 9, "name": "bird"},
    {"id": 11, "name": "fish"},  # never annotated: its AP is undefined and left out of the means
]
IMAGES = [
    {"id": 10, "file_name": "10.jpg", "width": 640, "height": 480},
    {"id": 20, "file_name": "20.jpg", "width": 300, "height": 500},
    {"id": 30, "file_name": "30.jpg", "width": 200, "height": 100},  # no annotations
    {"id": 40, "file_name": "40.jpg", "width": 1024, "height": 768},
]
# (image_id, category_id, [x, y, w, h], iscrowd)
OBJECTS = [
    (10, 2, [100.0, 80.0, 200.0, 160.0], 0),  # large (32000)
    (10, 5, [300.0, 200.0, 50.0, 40.0], 0),  # medium (2000)
    (20, 9, [10.0, 20.0, 20.0, 15.0], 0),  # small (300)
    (20, 2, [150.0, 300.0, 40.0, 60.0], 0),  # medium (2400)
    (20, 5, [0.0, 0.0, 100.0, 100.0], 1),  # crowd region
    (40, 5, [500.0, 300.0, 300.0, 250.0], 0),  # large (75000)
    (40, 9, [50.0, 60.0, 40.0, 30.0], 0),  # medium (1200)
]


def _gt_dict(images=IMAGES, objects=OBJECTS, categories=CATEGORIES) -> dict:
    annotations = [
        {
            "id": k + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": crowd,
        }
        for k, (image_id, category_id, bbox, crowd) in enumerate(objects)
    ]
    return {"images": list(images), "annotations": annotations, "categories": list(categories)}


@pytest.fixture
def gt_path(tmp_path: Path) -> Path:
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(_gt_dict()))
    return path


def _perfect_rows(image_ids=None) -> list[dict]:
    return [
        {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": 0.9 - 0.01 * k}
        for k, (image_id, category_id, bbox, crowd) in enumerate(OBJECTS)
        if not crowd and (image_ids is None or image_id in image_ids)
    ]


def _pycocotools_stats(gt: dict, rows: list[dict]) -> tuple[np.ndarray, str]:
    """Stats and summarize() output of plain pycocotools, run the documented way."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(json.loads(json.dumps(rows)))
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_eval.summarize()
    return coco_eval.stats, out.getvalue()


def _assert_metrics(metrics: dict, expected: dict, tol: float = 1e-9) -> None:
    assert list(metrics) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert metrics[name] == pytest.approx(expected[name], abs=tol), name


# ----------------------------------------------------------------------------------------------------------
# detections_to_coco
# ----------------------------------------------------------------------------------------------------------


def test_detections_to_coco_pixels_by_hand():
    # (l, t, r, b) = (0.1, 0.2, 0.5, 0.6) on a 640x480 (W x H) image:
    # x = 0.1*640 = 64, y = 0.2*480 = 96, w = 0.4*640 = 256, h = 0.4*480 = 192.
    det = {
        "boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6]], dtype=torch.float64),
        "scores": torch.tensor([0.75]),
        "labels": torch.tensor([1]),
    }
    rows = detections_to_coco(torch.tensor([397133]), torch.tensor([[480, 640]]), [det], [18])
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == {"image_id", "category_id", "bbox", "score"}
    assert row["image_id"] == 397133 and isinstance(row["image_id"], int)
    assert row["category_id"] == 18 and isinstance(row["category_id"], int)
    assert row["bbox"] == pytest.approx([64.0, 96.0, 256.0, 192.0], abs=1e-9)
    assert row["score"] == pytest.approx(0.75)
    json.dumps(rows)  # plain Python types only


def test_detections_to_coco_category_map_and_grouping():
    # Labels are contiguous 1..3 -> dataset ids (2, 5, 9); a CategoryMap is duck-typed by .dataset_ids.
    categories = SimpleNamespace(dataset_ids=[2, 5, 9])
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], dtype=torch.float16),
            "scores": torch.tensor([0.9, 0.3], dtype=torch.float16),
            "labels": torch.tensor([3, 1]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {
            "boxes": torch.tensor([[0.25, 0.5, 0.75, 1.0]]),
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([2]),
        },
    ]
    sizes = [(100, 200), (50, 50), (300, 40)]  # (height, width)
    rows = detections_to_coco([7, 8, 9], sizes, dets, categories)
    assert [r["image_id"] for r in rows] == [7, 7, 9]
    assert [r["category_id"] for r in rows] == [9, 2, 5]
    assert rows[0]["bbox"] == pytest.approx([0.0, 0.0, 100.0, 50.0])
    assert rows[1]["bbox"] == pytest.approx([100.0, 50.0, 100.0, 50.0])
    assert rows[2]["bbox"] == pytest.approx([10.0, 150.0, 20.0, 150.0])
    assert rows[0]["score"] == pytest.approx(0.9, abs=1e-3)
    # A plain list of dataset ids works the same as the map.
    assert detections_to_coco([7, 8, 9], sizes, dets, [2, 5, 9]) == rows


def test_detections_to_coco_no_clip_by_default_clip_on_request():
    # A box sticking out of a 200x100 (W x H) image: (l, t, r, b) = (-0.1, 0.5, 1.2, 1.1).
    det = {
        "boxes": torch.tensor([[-0.1, 0.5, 1.2, 1.1]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([1]),
    }
    # NVIDIA (no clip): x = -20, y = 50, w = 1.3*200 = 260, h = 0.6*100 = 60.
    (row,) = detections_to_coco([1], [(100, 200)], [det], [1])
    assert row["bbox"] == pytest.approx([-20.0, 50.0, 260.0, 60.0], abs=1e-4)
    # Clipped to [0, 200] x [0, 100]: (0, 0.5, 1, 1) -> [0, 50, 200, 50].
    (row,) = detections_to_coco([1], [(100, 200)], [det], [1], clip=True)
    assert row["bbox"] == pytest.approx([0.0, 50.0, 200.0, 50.0], abs=1e-4)


def test_detections_to_coco_empty_and_errors():
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    assert detections_to_coco([1, 2], [(10, 10), (20, 20)], [empty, empty], [1]) == []
    assert detections_to_coco([], torch.zeros(0, 2), [], [1]) == []
    det = {"boxes": torch.rand(1, 4), "scores": torch.rand(1), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match="outside 1..2"):
        detections_to_coco([1], [(10, 10)], [det], [4, 6])
    with pytest.raises(ValueError, match="image ids"):
        detections_to_coco([1, 2], [(10, 10)], [det], [4, 6])


def test_detections_to_coco_round_trip_scores_perfectly(gt_path: Path):
    # Relative boxes built from the GT (as a model on the squashed 300x300 input would predict them) convert
    # back to the GT pixels and score AP 1.
    categories = [c["id"] for c in CATEGORIES]
    sizes = {im["id"]: (im["height"], im["width"]) for im in IMAGES}
    ids, hw, dets = [], [], []
    for image in IMAGES:
        objs = [(c, b) for i, c, b, crowd in OBJECTS if i == image["id"] and not crowd]
        h, w = sizes[image["id"]]
        boxes = [[x / w, y / h, (x + bw) / w, (y + bh) / h] for _, (x, y, bw, bh) in objs]
        ids.append(image["id"])
        hw.append((h, w))
        dets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.linspace(0.9, 0.5, len(objs)),
                "labels": torch.tensor([categories.index(c) + 1 for c, _ in objs], dtype=torch.int64),
            }
        )
    rows = detections_to_coco(ids, hw, dets, categories)
    assert len(rows) == 6
    _assert_metrics(evaluate_detections(gt_path, rows), dict.fromkeys(METRIC_NAMES, 1.0), tol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# evaluate_detections: hand-checked cases
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_score_one(gt_path: Path, backend: str):
    # Every non-crowd object found exactly (IoU 1), nothing else: precision 1 at every recall, every category
    # with ground truth, every IoU threshold and area range (small, medium and large all occur) -> AP = 1;
    # recall 1 -> AR = 1, also at maxDets=1 (one object per image and category). "fish" has no ground truth:
    # undefined (-1) and left out of the means.
    rows = _perfect_rows()
    ones = dict.fromkeys(METRIC_NAMES, 1.0)
    _assert_metrics(evaluate_detections(gt_path, rows, backend=backend), ones)
    # A detection on the crowd region matches the crowd annotation and is ignored (neither TP nor FP); a
    # false positive scored below every true positive comes after recall 1 and leaves the interpolated
    # precision at 1.
    extra = [
        {"image_id": 20, "category_id": 5, "bbox": [0.0, 0.0, 100.0, 100.0], "score": 0.95},
        {"image_id": 30, "category_id": 2, "bbox": [10.0, 10.0, 50.0, 50.0], "score": 0.01},
    ]
    _assert_metrics(evaluate_detections(gt_path, rows + extra, backend=backend), ones)


def _two_object_gt() -> dict:
    # One image (100x100), one category, two medium objects.
    return _gt_dict(
        images=[{"id": 1, "file_name": "1.jpg", "width": 100, "height": 100}],
        objects=[(1, 1, [10.0, 10.0, 40.0, 40.0], 0), (1, 1, [60.0, 60.0, 30.0, 35.0], 0)],  # 1600, 1050
        categories=[{"id": 1, "name": "thing"}],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_of_two_found_by_hand(backend: str):
    # Detections (by score): object A exactly (IoU 1, TP at every IoU threshold); object B missed.
    # Precision/recall after the only detection: P = 1, R = 1/2.
    # COCO interpolates precision at 101 recall thresholds 0, 0.01, ..., 1: p(r) = max precision at
    # recall >= r, so p = 1 for r in {0, ..., 0.50} (51 thresholds) and 0 for r in {0.51, ..., 1}
    # (50 thresholds; recall never gets there). AP at every IoU threshold = 51/101 = 0.50495..., so
    # AP = AP50 = AP75 = 51/101; both objects are medium: APm = 51/101, APs = APl = -1 (no ground truth
    # there). Recall = 1/2 at every IoU threshold and every maxDets (1 detection):
    # AR1 = AR10 = AR100 = ARm = 0.5, ARs = ARl = -1.
    gt = _two_object_gt()
    rows = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.9}]
    ap = 51 / 101
    expected = dict(AP=ap, AP50=ap, AP75=ap, APs=-1, APm=ap, APl=-1, AR1=0.5, AR10=0.5, AR100=0.5)
    expected.update(ARs=-1, ARm=0.5, ARl=-1)
    _assert_metrics(evaluate_detections(gt, rows, backend=backend), expected)

    # Add a false positive (no overlap) scored above the hit. By score: FP (P = 0, R = 0), then TP (P = 1/2,
    # R = 1/2). Interpolated p(r) = 1/2 for r <= 0.50 and 0 beyond: AP = 0.5 * 51/101 at every IoU threshold.
    # maxDets=1 keeps only the FP: AR1 = 0; AR10 = AR100 = 0.5. The FP is small (20x20 = 400): in the medium
    # range an unmatched detection outside the range is ignored, so APm stays 51/101; in the small range there
    # is still no ground truth, so APs/ARs stay -1.
    rows.append({"image_id": 1, "category_id": 1, "bbox": [0.0, 70.0, 20.0, 20.0], "score": 0.95})
    ap = 0.5 * 51 / 101
    expected.update(AP=ap, AP50=ap, AP75=ap, AR1=0.0)
    _assert_metrics(evaluate_detections(gt, rows, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_ids_restrict_the_evaluation(gt_path: Path, backend: str):
    # Only image 10 detected (perfectly). Over image 10 alone that is perfect; it has no small object, so
    # APs/ARs are undefined. Rows of other images are ignored.
    rows = _perfect_rows(image_ids={10}) + [
        {"image_id": 40, "category_id": 2, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.99}
    ]
    expected = dict.fromkeys(METRIC_NAMES, 1.0) | {"APs": -1.0, "ARs": -1.0}
    _assert_metrics(evaluate_detections(gt_path, rows, image_ids=[10], backend=backend), expected)
    # Over all images the objects of images 20 and 40 are missed.
    assert evaluate_detections(gt_path, rows, backend=backend)["AP"] < 0.7
    # The image without annotations alone: nothing to measure.
    _assert_metrics(
        evaluate_detections(gt_path, rows, image_ids=[30], backend=backend), dict.fromkeys(METRIC_NAMES, -1.0)
    )
    _assert_metrics(
        evaluate_detections(gt_path, rows, image_ids=[], backend=backend), dict.fromkeys(METRIC_NAMES, -1.0)
    )
    with pytest.raises(ValueError, match="not in the annotations"):
        evaluate_detections(gt_path, rows, image_ids=[10, 12345], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_detections(gt_path: Path, tmp_path: Path, backend: str):
    # No detections: there is ground truth in every area range, and nothing found it -> every metric 0.0
    # (pycocotools' own loadRes would crash on the empty list).
    zeros = dict.fromkeys(METRIC_NAMES, 0.0)
    _assert_metrics(evaluate_detections(gt_path, [], backend=backend), zeros)
    empty_file = write_json_atomic(tmp_path / "detections.json", [])
    _assert_metrics(evaluate_detections(gt_path, empty_file, backend=backend), zeros)
    # Where a range has no ground truth the metric is undefined (-1), as COCO reports it.
    expected = dict(zeros, APs=-1.0, APl=-1.0, ARs=-1.0, ARl=-1.0)
    _assert_metrics(evaluate_detections(_two_object_gt(), [], backend=backend), expected)


def test_inputs_paths_dicts_and_coco_objects_agree(gt_path: Path, tmp_path: Path):
    from pycocotools.coco import COCO

    rows = _perfect_rows()[:4]
    snapshot = json.loads(json.dumps(rows))
    reference = evaluate_detections(gt_path, rows)
    assert rows == snapshot  # the caller's rows are not modified (the evaluators add keys to what they get)
    det_file = write_json_atomic(tmp_path / "detections.json", rows)
    assert evaluate_detections(str(gt_path), str(det_file)) == reference
    assert evaluate_detections(_gt_dict(), det_file) == reference
    with contextlib.redirect_stdout(io.StringIO()):
        pycoco_gt = COCO(str(gt_path))
    for backend in BACKENDS:
        gt = load_annotations(pycoco_gt, backend)
        # A loaded object can be reused (e.g. every validation epoch) with the same result.
        for _ in range(2):
            _assert_metrics(evaluate_detections(gt, rows, backend=backend), reference, tol=1e-4)


def test_evaluation_is_quiet(gt_path: Path, capsys: pytest.CaptureFixture):
    for backend in BACKENDS:
        evaluate_detections(gt_path, _perfect_rows(), backend=backend)
        evaluate_detections(gt_path, [], backend=backend)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_user_errors_are_one_clear_line(gt_path: Path, tmp_path: Path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_detections(missing, [])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        evaluate_detections(bad, [])
    with pytest.raises(ValueError, match="bad.json"):
        evaluate_detections(gt_path, bad)
    with pytest.raises(ValueError, match="not in the annotations"):
        evaluate_detections(
            gt_path, [{"image_id": 999, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1.0}]
        )
    with pytest.raises(ValueError, match="score"):
        evaluate_detections(gt_path, [{"image_id": 10, "category_id": 2, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="pycocotools"):
        evaluate_detections(gt_path, [], backend="torchmetrics")
    no_bbox = _gt_dict()
    del no_bbox["annotations"][0]["bbox"]
    with pytest.raises(ValueError, match="lacks bbox"):
        evaluate_detections(no_bbox, [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bbox_only_ground_truth_takes_the_box_area(backend: str):
    # Many exporters write bbox-only files: no area, iscrowd or id. They score as if area = w x h, iscrowd = 0
    # (the two objects of test_one_of_two_found_by_hand: 1600 and 1050 px, both medium; AP = 51/101).
    full = _two_object_gt()
    bare = _two_object_gt()
    for ann in bare["annotations"]:
        for key in ("area", "iscrowd", "id"):
            del ann[key]
    rows = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.9}]
    scored = evaluate_detections(bare, rows, backend=backend)
    assert scored == evaluate_detections(full, rows, backend=backend)
    assert scored["APm"] == pytest.approx(51 / 101) and scored["APs"] == scored["APl"] == -1
    assert "area" not in bare["annotations"][0]  # the caller's dict is not modified
    filled = complete_bbox_fields(bare)["annotations"]
    assert [(a["area"], a["iscrowd"], a["id"]) for a in filled] == [(1600.0, 0, 1), (1050.0, 0, 2)]


# ----------------------------------------------------------------------------------------------------------
# faster-coco-eval == pycocotools; format_table == summarize()
# ----------------------------------------------------------------------------------------------------------


def _random_case(seed: int, num_images: int = 25, num_categories: int = 4) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    cat_ids = [3, 8, 13, 21][:num_categories]
    images, objects, rows = [], [], []
    for image_id in range(1, num_images + 1):
        w, h = int(rng.integers(100, 800)), int(rng.integers(100, 800))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": w, "height": h})
        for _ in range(int(rng.integers(0, 8))):
            bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
            box = [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh]
            cat = int(rng.choice(cat_ids))
            objects.append((image_id, cat, box, int(rng.random() < 0.05)))
            for _ in range(int(rng.integers(0, 3))):  # noisy copies, sometimes of the wrong class
                noisy = list(np.asarray(box) + rng.normal(0, 0.1, 4) * [bw, bh, bw, bh])
                dcat = cat if rng.random() < 0.8 else int(rng.choice(cat_ids))
                rows.append({"image_id": image_id, "category_id": dcat, "bbox": noisy, "score": rng.random()})
        for _ in range(int(rng.integers(0, 6))):  # background false positives
            bw, bh = float(rng.uniform(2, w / 2)), float(rng.uniform(2, h / 2))
            box = [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh]
            rows.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": box,
                    "score": rng.random(),
                }
            )
    for row in rows:
        row["bbox"] = [float(v) for v in row["bbox"]]
        row["score"] = float(row["score"])
    return _gt_dict(images, objects, [{"id": c, "name": str(c)} for c in cat_ids]), rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_coco_eval_equals_pycocotools(seed: int):
    gt, rows = _random_case(seed)
    ref_stats, _ = _pycocotools_stats(gt, rows)
    fast = evaluate_detections(gt, rows, backend="faster_coco_eval")
    slow = evaluate_detections(gt, rows, backend="pycocotools")
    assert 0.05 < fast["AP"] < 0.95  # a non-trivial case
    for k, name in enumerate(METRIC_NAMES):
        assert slow[name] == pytest.approx(float(ref_stats[k]), abs=1e-12), name
        assert fast[name] == pytest.approx(slow[name], abs=1e-4), name


@pytest.mark.parametrize("case", ["random", "undefined"])
def test_format_table_matches_pycocotools_summarize(case: str):
    if case == "random":
        gt, rows = _random_case(3)
    else:  # a table with -1.000 entries
        gt, rows = (
            _two_object_gt(),
            [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 41], "score": 0.5}],
        )
    stats, printed = _pycocotools_stats(gt, rows)
    assert format_table(evaluate_detections(gt, rows)) + "\n" == printed
    assert format_table(list(stats)) + "\n" == printed
    lines = format_table(dict(zip(METRIC_NAMES, stats, strict=True))).split("\n")
    assert len(lines) == 12
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ")


def test_format_table_known_line_and_errors():
    # a published 12-line table
    values = [0.25, 0.424, 0.255, 0.074, 0.268, 0.4, 0.237, 0.344, 0.359, 0.116, 0.392, 0.55]
    metrics = dict(zip(METRIC_NAMES, values, strict=True))
    lines = format_table(metrics).split("\n")
    assert lines[0] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.250"
    assert lines[1] == " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = 0.424"
    assert lines[4] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = 0.268"
    assert lines[6] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.237"
    assert lines[11] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = 0.550"
    with pytest.raises(ValueError, match="ARl"):
        format_table({k: v for k, v in metrics.items() if k != "ARl"})
    with pytest.raises(ValueError, match="12"):
        format_table([0.1] * 11)


# ----------------------------------------------------------------------------------------------------------
# DDP merge, JSON outputs
# ----------------------------------------------------------------------------------------------------------


def test_merge_detections_drops_padding_duplicates():
    def row(image_id: int, score: float) -> dict:
        return {"image_id": image_id, "category_id": 1, "bbox": [0, 0, 1, 1], "score": score}

    rank0 = [row(1, 0.9), row(1, 0.8), row(3, 0.7)]
    rank1 = [row(2, 0.6), row(1, 0.9), row(1, 0.8), row(4, 0.5)]  # image 1 again: a padding duplicate
    rank2 = [row(3, 0.7), row(5, 0.4)]  # image 3 again
    merged = merge_detections([rank0, rank1, rank2])
    assert [(r["image_id"], r["score"]) for r in merged] == [
        (1, 0.9),
        (1, 0.8),
        (3, 0.7),
        (2, 0.6),
        (4, 0.5),
        (5, 0.4),
    ]
    assert merge_detections([]) == [] and merge_detections([[], []]) == []
    merged[0]["score"] = 0.0
    assert rank0[0]["score"] == 0.9  # copies, not the gathered dicts


def test_metrics_json_round_trip(gt_path: Path, tmp_path: Path):
    gt, rows = _random_case(4)
    metrics = evaluate_detections(gt, rows)
    path = write_json_atomic(tmp_path / "run" / "metrics.json", metrics, indent=2)
    assert path == tmp_path / "run" / "metrics.json"
    read = json.loads(path.read_text())
    assert read == metrics and list(read) == list(METRIC_NAMES)
    assert format_table(read) == format_table(metrics)


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path: Path):
    path = tmp_path / "detections.json"
    write_json_atomic(path, [{"a": 1}])
    assert json.loads(path.read_text()) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["detections.json"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # like open(path, "w")

    # The object fails to serialise half-way through: the old file stays, no temporary file is left.
    with pytest.raises(TypeError):
        write_json_atomic(path, [{"a": 2}, {"b": object()}])
    assert json.loads(path.read_text()) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["detections.json"]

    write_json_atomic(path, {"AP": 0.5})
    assert json.loads(path.read_text()) == {"AP": 0.5}
    assert os.listdir(tmp_path) == ["detections.json"]
