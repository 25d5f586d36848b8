"""``benchmark.py mode=eval``: COCO evaluation speed on a generated COCO-val-sized set, per back end.

Also checks that faster-coco-eval and pycocotools give the same 12 numbers.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ssd_lightning.errors import ConfigError
from ssd_lightning.evaluation import BACKENDS, evaluate_detections, load_annotations
from ssd_lightning.tasks.benchmark.common import PeakMemory, summarize


def synthetic_coco_results(
    num_images: int, objects_per_image: float, detections_per_image: int, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A COCO ground truth (80 categories with COCO's ids, images 300-640 px, small/medium/large boxes, 1%
    crowd) and ``detections_per_image`` result rows per image (3 noisy copies of each object, 80% with the
    right class, then random boxes), the shape of SSD300's output on COCO val2017."""

    rng = np.random.default_rng(seed)
    cat_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    images, annotations, rows = [], [], []

    def random_boxes(n: int, w: int, h: int):
        side = np.exp(rng.uniform(np.log(6), np.log(0.9 * min(w, h)), size=(n, 1)))
        wh = np.minimum(side * np.exp(rng.normal(0, 0.35, size=(n, 2))), [w, h])
        xy = rng.uniform(0, 1, size=(n, 2)) * ([w, h] - wh)
        return np.concatenate([xy, wh], axis=1)

    for image_id in range(1, num_images + 1):
        w, h = int(rng.integers(300, 641)), int(rng.integers(300, 641))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
        n = int(rng.poisson(objects_per_image))
        gt = random_boxes(n, w, h)
        gt_cats = rng.choice(cat_ids, size=n)
        crowd = rng.random(n) < 0.01
        for box, cat, is_crowd in zip(gt.tolist(), gt_cats.tolist(), crowd.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(is_crowd),
                }
            )
        copies = np.repeat(np.arange(n), 3)[:detections_per_image]
        noisy = gt[copies] + rng.normal(0, 0.08, size=(len(copies), 4)) * np.tile(gt[copies, 2:], 2)
        noisy[:, 2:] = np.maximum(noisy[:, 2:], 1.0)
        noisy_cats = np.where(
            rng.random(len(copies)) < 0.8, gt_cats[copies], rng.choice(cat_ids, len(copies))
        )
        k = detections_per_image - len(copies)
        boxes = np.concatenate([noisy, random_boxes(k, w, h)])
        cats = np.concatenate([noisy_cats, rng.choice(cat_ids, size=k)]).astype(np.int64)
        scores = np.concatenate([rng.beta(4, 2, len(copies)), rng.beta(2, 4, k)])
        rows.extend(
            {"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
            for c, b, s in zip(cats.tolist(), boxes.tolist(), scores.tolist(), strict=True)
        )
    categories = [{"id": c, "name": f"class{c}"} for c in cat_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, rows


def bench_eval(cfg: DictConfig, settings: dict[str, Any]) -> list[dict[str, Any]]:

    bench = settings["benchmark"]
    ev = bench.get("eval") or {}
    num_images = int(ev.get("images", 5000))
    per_image = int(ev.get("detections_per_image", 100))
    backends = list(ev.get("backends") or ["faster_coco_eval"])
    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"benchmark.eval.backends: {backend!r} is not one of {', '.join(BACKENDS)}")
    t = time.perf_counter()
    gt, rows = synthetic_coco_results(
        num_images, float(ev.get("objects_per_image", 7)), per_image, int(cfg.get("seed") or 0)
    )
    build_seconds = time.perf_counter() - t
    records, stats = [], {}
    device = torch.device("cpu")
    for backend in backends:
        coco_gt = load_annotations(gt, backend)
        for _ in range(bench["warmup"]):
            evaluate_detections(coco_gt, rows, backend=backend)
        peak = PeakMemory(device)
        peak.reset()
        seconds = []
        for _ in range(bench["repeats"]):
            t = time.perf_counter()
            metrics = evaluate_detections(coco_gt, rows, backend=backend)
            seconds.append(time.perf_counter() - t)
        stats[backend] = metrics
        records.append(
            {
                "mode": "eval",
                "backend": backend,
                "batch_size": num_images,
                "images": num_images,
                "detections": len(rows),
                "device": "cpu",
                "steps": {"warmup": bench["warmup"], "timed": bench["repeats"]},
                "seconds": summarize(seconds),
                "images_per_s": summarize([num_images / s for s in seconds]),
                "metrics": metrics,
                "memory": peak.read(),
                "data_build_seconds": build_seconds,
            }
        )
    if len(stats) > 1:
        first = next(iter(stats.values()))
        diff = max(abs(m[k] - first[k]) for m in stats.values() for k in first)
        base = records[-1]["seconds"]["median"]
        for record in records:
            record["max_metric_difference_between_backends"] = diff
            record["speedup_vs_" + records[-1]["backend"]] = base / record["seconds"]["median"]
    return records
