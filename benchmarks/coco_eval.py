"""COCO bbox evaluation speed: faster-coco-eval vs pycocotools on a COCO-val-sized synthetic set.

A synthetic ground truth of 5,000 images (random sizes, 80 non-contiguous category ids, ~7 objects per image
over the small / medium / large ranges, 1% crowd) and 100 detections per image (noisy copies of the objects,
sometimes of the wrong class, plus random boxes) — the shape of SSD300's output on COCO val2017. Each back end
runs the documented sequence ``loadRes``, ``COCOeval(iouType="bbox")``, ``evaluate``, ``accumulate``,
``summarize`` on the same data; the script prints the time of each phase and checks that the 12 stats agree
(to 1e-4). It then times ``ssd_lightning.evaluation.evaluate_detections`` (default back end) end to end.

    python benchmarks/coco_eval.py                    # 5,000 images x 100 detections
    python benchmarks/coco_eval.py --images 500       # quick look

Results: benchmarks/results/coco_eval.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import time

import numpy as np

from ssd_lightning.evaluation import METRIC_NAMES, evaluate_detections, format_table
from ssd_lightning.tasks.benchmark.eval import synthetic_coco_results


def run_backend(backend: str, gt: dict, rows: list[dict]) -> tuple[np.ndarray, dict[str, float]]:
    """The documented COCO sequence with one back end; returns (stats[:12], seconds per phase)."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as Eval

            coco_gt = COCO()
            kwargs = {}
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval

            coco_gt = COCO(print_function=lambda *a, **k: None)
            kwargs = {"print_function": lambda *a, **k: None}
        coco_gt.dataset = gt
        coco_gt.createIndex()
        t0 = time.perf_counter()
        coco_dt = coco_gt.loadRes([dict(r) for r in rows])
        t1 = time.perf_counter()
        coco_eval = Eval(coco_gt, coco_dt, iouType="bbox", **kwargs)
        coco_eval.evaluate()
        t2 = time.perf_counter()
        coco_eval.accumulate()
        t3 = time.perf_counter()
        coco_eval.summarize()
        t4 = time.perf_counter()
    times = {"loadRes": t1 - t0, "evaluate": t2 - t1, "accumulate": t3 - t2, "summarize": t4 - t3}
    times["eval+acc+sum"] = t4 - t1
    times["total"] = t4 - t0
    return np.asarray(coco_eval.stats[:12], dtype=np.float64), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--objects", type=float, default=7.0, help="mean GT objects per image")
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible")
    t = time.perf_counter()
    gt, rows = synthetic_coco_results(args.images, args.objects, args.detections, args.seed)
    print(
        f"synthetic set: {len(gt['images'])} images, {len(gt['categories'])} categories, "
        f"{len(gt['annotations'])} GT boxes, {len(rows)} detections ({time.perf_counter() - t:.1f}s to build)"
    )

    results = {}
    for backend in ("faster_coco_eval", "pycocotools"):
        stats, times = run_backend(backend, gt, rows)
        results[backend] = (stats, times)
        print(f"{backend:>17}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))

    fast, slow = results["faster_coco_eval"][0], results["pycocotools"][0]
    diff = float(np.max(np.abs(fast - slow)))
    print(f"max |stats difference| = {diff:.2e} ({'OK' if diff <= 1e-4 else 'MISMATCH'}, tolerance 1e-4)")
    # faster-coco-eval's evaluate() already accumulates (in C++), so only the sum of the phases compares.
    for key in ("eval+acc+sum", "total"):
        speedup = results["pycocotools"][1][key] / results["faster_coco_eval"][1][key]
        print(f"speed-up {key}: {speedup:.1f}x")
    t = time.perf_counter()
    metrics = evaluate_detections(gt, rows)
    print(f"evaluate_detections (faster_coco_eval, end to end from dicts): {time.perf_counter() - t:.2f}s")
    same = max(abs(metrics[n] - float(v)) for n, v in zip(METRIC_NAMES, fast, strict=True))
    print(f"evaluate_detections vs raw faster-coco-eval: max |difference| = {same:.2e}")
    print(format_table(metrics))
    if diff > 1e-4:
        raise SystemExit("faster-coco-eval and pycocotools disagree")


if __name__ == "__main__":
    main()
