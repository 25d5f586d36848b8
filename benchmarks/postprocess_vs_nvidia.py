"""Post-processing speed: NVIDIA's per-image, per-class loop vs. this project's batched ``postprocess``.

The reference is NVIDIA DeepLearningExamples SSD300 v1.1's evaluation decode, restated here line by line
(``Encoder.decode_batch(ploc, plabel, criteria=0.5, max_output=200)`` -> ``scale_back_batch`` +
``decode_single``: per image, per class, scores > 0.05, the best 200, a Python ``while`` loop of greedy NMS
with ``calc_iou_tensor``, then the best 200 of the image). It is timed against

* ``ssd_lightning.postprocess.postprocess(nms_method="kernel")``: batched softmax, filter and top-k, then one
  torchvision NMS call per (image, class) group (batched NMS off), and
* ``ssd_lightning.postprocess.postprocess()``: the default (``auto``: on the CPU ``hybrid``), batched NMS,

on the same SSD300 outputs, and every image's detections are checked against NVIDIA's (same labels and boxes,
scores to 1e-6). Outputs are synthetic SSD300 heads ([N, 4, 8732] offsets, [N, C, 8732] logits):

* ``realistic``: the background dominates (logit 6 + noise) except on the default boxes that overlap a few
  objects per image, where one class gets a logit that grows with the overlap, plus Gaussian noise on every
  logit: about 1,800 class scores above 0.05 per image, most of them noise spread over all classes.
* ``dense``: Gaussian logits (std 2.5) over all classes: thousands of candidates per image, up to 200 per
  class (the worst case for every implementation).

    python benchmarks/postprocess_vs_nvidia.py                        # batch 32, 81 classes, both cases
    python benchmarks/postprocess_vs_nvidia.py --case realistic --repeats 9 --nvidia-repeats 5

Results: benchmarks/results/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from ssd_lightning.boxes import DefaultBoxes, ssd300_default_boxes
from ssd_lightning.postprocess import postprocess

# ------------------------------------------------------------------------------------------------------
# NVIDIA DeepLearningExamples SSD300 v1.1 (PyTorch/Detection/SSD/ssd/utils.py), restated
# ------------------------------------------------------------------------------------------------------


def calc_iou_tensor(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """NVIDIA's ``calc_iou_tensor``: IoU [N, M] of ltrb boxes [N, 4] and [M, 4]."""
    n, m = box1.size(0), box2.size(0)
    be1 = box1.unsqueeze(1).expand(-1, m, -1)
    be2 = box2.unsqueeze(0).expand(n, -1, -1)
    lt = torch.max(be1[:, :, :2], be2[:, :, :2])
    rb = torch.min(be1[:, :, 2:], be2[:, :, 2:])
    delta = rb - lt
    delta[delta < 0] = 0
    intersect = delta[:, :, 0] * delta[:, :, 1]
    delta1 = be1[:, :, 2:] - be1[:, :, :2]
    area1 = delta1[:, :, 0] * delta1[:, :, 1]
    delta2 = be2[:, :, 2:] - be2[:, :, :2]
    area2 = delta2[:, :, 0] * delta2[:, :, 1]
    return intersect / (area1 + area2 - intersect)


class NvidiaEncoder:
    """The decode half of NVIDIA's ``Encoder`` (``scale_back_batch``, ``decode_batch``, ``decode_single``)."""

    def __init__(self, default_boxes: DefaultBoxes) -> None:
        self.dboxes_xywh = default_boxes.xywh.unsqueeze(dim=0)
        self.scale_xy = default_boxes.scale_xy
        self.scale_wh = default_boxes.scale_wh

    def scale_back_batch(self, bboxes_in: torch.Tensor, scores_in: torch.Tensor):
        dboxes_xywh = self.dboxes_xywh.to(bboxes_in.device)
        bboxes_in = bboxes_in.permute(0, 2, 1)
        scores_in = scores_in.permute(0, 2, 1)
        bboxes_in[:, :, :2] = self.scale_xy * bboxes_in[:, :, :2]
        bboxes_in[:, :, 2:] = self.scale_wh * bboxes_in[:, :, 2:]
        bboxes_in[:, :, :2] = bboxes_in[:, :, :2] * dboxes_xywh[:, :, 2:] + dboxes_xywh[:, :, :2]
        bboxes_in[:, :, 2:] = bboxes_in[:, :, 2:].exp() * dboxes_xywh[:, :, 2:]
        left = bboxes_in[:, :, 0] - 0.5 * bboxes_in[:, :, 2]
        top = bboxes_in[:, :, 1] - 0.5 * bboxes_in[:, :, 3]
        right = bboxes_in[:, :, 0] + 0.5 * bboxes_in[:, :, 2]
        bottom = bboxes_in[:, :, 1] + 0.5 * bboxes_in[:, :, 3]
        bboxes_in[:, :, 0] = left
        bboxes_in[:, :, 1] = top
        bboxes_in[:, :, 2] = right
        bboxes_in[:, :, 3] = bottom
        return bboxes_in, F.softmax(scores_in, dim=-1)

    def decode_batch(self, bboxes_in, scores_in, criteria=0.5, max_output=200):
        # NVIDIA writes the decoded boxes into its input; work on a copy so the caller's tensors survive
        bboxes, probs = self.scale_back_batch(bboxes_in.clone(), scores_in)
        output = []
        for bbox, prob in zip(bboxes.split(1, 0), probs.split(1, 0), strict=True):
            output.append(self.decode_single(bbox.squeeze(0), prob.squeeze(0), criteria, max_output))
        return output

    def decode_single(self, bboxes_in, scores_in, criteria, max_output, max_num=200):
        bboxes_out, scores_out, labels_out = [], [], []
        for i, score in enumerate(scores_in.split(1, 1)):
            if i == 0:  # background
                continue
            score = score.squeeze(1)
            mask = score > 0.05
            bboxes, score = bboxes_in[mask, :], score[mask]
            if score.size(0) == 0:
                continue
            score_sorted, score_idx_sorted = score.sort(dim=0)
            score_idx_sorted = score_idx_sorted[-max_num:]
            candidates = []
            while score_idx_sorted.numel() > 0:
                idx = score_idx_sorted[-1].item()
                bboxes_sorted = bboxes[score_idx_sorted, :]
                bboxes_idx = bboxes[idx, :].unsqueeze(dim=0)
                iou_sorted = calc_iou_tensor(bboxes_sorted, bboxes_idx).squeeze()
                score_idx_sorted = score_idx_sorted[iou_sorted < criteria]
                candidates.append(idx)
            bboxes_out.append(bboxes[candidates, :])
            scores_out.append(score[candidates])
            labels_out.extend([i] * len(candidates))
        if not bboxes_out:
            return [torch.tensor([]) for _ in range(3)]
        bboxes_out = torch.cat(bboxes_out, dim=0)
        labels_out = torch.tensor(labels_out, dtype=torch.long)
        scores_out = torch.cat(scores_out, dim=0)
        _, max_ids = scores_out.sort(dim=0)
        max_ids = max_ids[-max_output:].to("cpu")
        return bboxes_out[max_ids, :], labels_out[max_ids], scores_out[max_ids]


# ------------------------------------------------------------------------------------------------------
# Synthetic SSD300 outputs
# ------------------------------------------------------------------------------------------------------


def synthetic_outputs(
    case: str, batch: int, num_classes: int, seed: int = 0, objects: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(locs [N, 4, 8732], confs [N, C, 8732]) float32, see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    anchors = ssd300_default_boxes()
    num_anchors = len(anchors)
    locs = torch.randn(batch, 4, num_anchors, generator=g) * 0.5
    if case == "dense":
        return locs, torch.randn(batch, num_classes, num_anchors, generator=g) * 2.5
    if case != "realistic":
        raise ValueError(f"unknown case {case!r}: realistic or dense")
    confs = torch.randn(batch, num_classes, num_anchors, generator=g)
    confs[:, 0] += 6.0
    for n in range(batch):
        size = torch.rand(objects, 2, generator=g) * 0.5 + 0.05
        centre = torch.rand(objects, 2, generator=g) * (1 - size) + size / 2
        objs = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        from torchvision.ops import box_iou

        iou = box_iou(objs, anchors.ltrb)  # [objects, A]
        labels = torch.randint(1, num_classes, (objects,), generator=g)
        for o in range(objects):
            near = iou[o] > 0.2
            confs[n, labels[o], near] += 12.0 * iou[o, near] + 1.0
    return locs, confs


# ------------------------------------------------------------------------------------------------------
# Comparison and timing
# ------------------------------------------------------------------------------------------------------


def same_detections(nvidia: list, ours: list[dict]) -> tuple[bool, str]:
    """NVIDIA's (boxes, labels, scores ascending) vs ours (descending): same labels and boxes, scores 1e-6."""
    for n, ((boxes, labels, scores), d) in enumerate(zip(nvidia, ours, strict=True)):
        if scores.numel() == 0:
            if d["scores"].numel():
                return False, f"image {n}: NVIDIA none, ours {d['scores'].numel()}"
            continue
        boxes, labels, scores = boxes.flip(0), labels.flip(0), scores.flip(0)
        if d["scores"].numel() != scores.numel():
            return False, f"image {n}: {scores.numel()} NVIDIA detections, {d['scores'].numel()} ours"
        if not torch.equal(d["labels"].cpu(), labels):
            return False, f"image {n}: labels differ"
        if not torch.allclose(d["boxes"].cpu(), boxes, rtol=1e-6, atol=1e-6):
            return False, f"image {n}: boxes differ"
        if not torch.allclose(d["scores"].cpu(), scores, rtol=1e-6, atol=1e-7):
            return False, f"image {n}: scores differ"
    return True, "identical"


def timed(fn, repeats: int, warmup: int = 0) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_case(case: str, args: argparse.Namespace, device: torch.device) -> None:
    """Time and compare the three implementations on one kind of outputs; print a Markdown table."""
    boxes = ssd300_default_boxes()
    encoder = NvidiaEncoder(boxes)
    locs, confs = synthetic_outputs(case, args.batch, args.classes, args.seed)
    locs, confs = locs.to(device), confs.to(device)
    candidates = int((confs.softmax(1)[:, 1:] > 0.05).sum()) / args.batch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_nvidia():
        out = encoder.decode_batch(locs, confs, 0.5, 200)
        sync()
        return out

    def run_per_group():
        out = postprocess(locs, confs, boxes, nms_method="kernel")
        sync()
        return out

    def run_batched():
        out = postprocess(locs, confs, boxes)
        sync()
        return out

    nvidia = run_nvidia()
    results = {"nvidia": None, "per-group NMS": run_per_group(), "batched (default)": run_batched()}
    # round robin, so that load from other processes hits every implementation alike
    t_nvidia, t_per_group, t_batched = [], [], []
    for r in range(max(args.repeats, args.nvidia_repeats)):
        if r < args.nvidia_repeats:
            t_nvidia += timed(run_nvidia, 1)
        if r < args.repeats:
            t_per_group += timed(run_per_group, 1)
            t_batched += timed(run_batched, 1)
    detections = sum(int(s.numel()) for _, _, s in nvidia) / args.batch
    print(
        f"\n## {case}: {candidates:.0f} class scores > 0.05 per image, {detections:.1f} detections per image"
    )
    print("| implementation | median s / batch | min - max | images/s | speed-up vs NVIDIA | detections |")
    print("|---|---:|---:|---:|---:|---|")
    base = statistics.median(t_nvidia)
    timings = (("nvidia", t_nvidia), ("per-group NMS", t_per_group), ("batched (default)", t_batched))
    for name, times in timings:
        med = statistics.median(times)
        same = "(the reference)" if name == "nvidia" else same_detections(nvidia, results[name])[1]
        print(
            f"| {name} | {med:.4f} | {min(times):.4f} - {max(times):.4f} | {args.batch / med:.0f} | "
            f"{base / med:.1f}x | {same} |"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=81)
    parser.add_argument("--case", choices=("realistic", "dense", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the batched versions")
    parser.add_argument("--nvidia-repeats", type=int, default=3, help="timed runs of NVIDIA's loop")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, for every implementation (1: stable on a shared CPU)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (NVIDIA's loop also runs there)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads, device {device}, batch {args.batch}, {args.classes} classes, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for case in ("realistic", "dense") if args.case == "both" else (args.case,):
        run_case(case, args, device)


if __name__ == "__main__":
    main()
