"""Data pipeline throughput (images/s): the DALI pipelines vs the same chain in torchvision.transforms.v2.

Both sides do the full work per image on the CPU with 2 workers (DALI: ``num_threads=2``; torch: a DataLoader
with ``num_workers=2``), over synthetic 640x480 JPEGs:

* train: JPEG decode, SSD random crop (min IoU drawn from {0, .1, .3, .5, .7, .9} or no crop, scale .3-1,
  aspect .5-2), horizontal flip with boxes, 300x300 resize, colour jitter (brightness .875-1.125, contrast
  .5-1.5, saturation .5-1.5, hue +-0.5 deg), ImageNet normalisation, encoding to the 8732 default boxes
  (IoU 0.5, best anchor per object forced). DALI decodes only the crop window (ROI decode).
* val: JPEG decode, 300x300 resize, ImageNet normalisation, image ids and sizes.

Usage::

    python benchmarks/data_pipeline.py [--images 256] [--batch-size 32] [--epochs 5] [--workers 2]
        [--device cpu|gpu]

Prints a Markdown table; results are recorded in benchmarks/results/data_pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from nvidia.dali import __version__ as dali_version
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import decode_jpeg, read_file
from torchvision.ops import box_convert, box_iou
from torchvision.transforms import v2

from ssd_lightning.boxes import ssd300_default_boxes
from ssd_lightning.data import COCODataModule, write_synthetic_coco
from ssd_lightning.images import IMAGENET_MEAN, IMAGENET_STD

# ------------------------------------------------------------------------------------ torchvision side


class Encoder:
    """NVIDIA's box encoder (``ssd/utils.py: Encoder.encode``): 8732 xywh targets + labels, IoU 0.5."""

    def __init__(self, criteria: float = 0.5) -> None:
        self.anchors_ltrb = ssd300_default_boxes().ltrb
        self.anchors_xywh = ssd300_default_boxes().xywh
        self.criteria = criteria

    def __call__(self, boxes_ltrb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if boxes_ltrb.numel() == 0:
            return self.anchors_xywh.clone(), torch.zeros(len(self.anchors_xywh), dtype=torch.int64)
        ious = box_iou(boxes_ltrb, self.anchors_ltrb)  # [G, A]
        best_dbox_ious, best_dbox_idx = ious.max(dim=0)
        best_bbox_idx = ious.argmax(dim=1)
        best_dbox_ious.index_fill_(0, best_bbox_idx, 2.0)
        best_dbox_idx[best_bbox_idx] = torch.arange(len(best_bbox_idx))
        masks = best_dbox_ious > self.criteria
        out_labels = torch.zeros(len(self.anchors_ltrb), dtype=torch.int64)
        out_labels[masks] = labels[best_dbox_idx[masks]]
        out_boxes = self.anchors_ltrb.clone()
        out_boxes[masks] = boxes_ltrb[best_dbox_idx[masks]]
        return box_convert(out_boxes, "xyxy", "cxcywh"), out_labels


class TorchCOCO(Dataset):
    def __init__(self, image_dir: Path, ann_file: Path, train: bool) -> None:
        doc = json.loads(ann_file.read_text())
        self.image_dir = image_dir
        self.label = {c["id"]: i + 1 for i, c in enumerate(doc["categories"])}
        anns: dict[int, list] = {}
        for a in doc["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        self.images = [im for im in doc["images"] if not train or im["id"] in anns]
        self.anns = anns
        self.train = train
        mean_std = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if train:
            self.transform = v2.Compose(
                [
                    v2.RandomIoUCrop(
                        min_scale=0.3,
                        max_scale=1.0,
                        min_aspect_ratio=0.5,
                        max_aspect_ratio=2.0,
                        sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],  # 1.0 = no crop
                    ),
                    v2.SanitizeBoundingBoxes(),
                    v2.RandomHorizontalFlip(0.5),
                    v2.Resize((300, 300), antialias=True),
                    v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.5 / 360),
                    *mean_std,
                ]
            )
            self.encoder = Encoder()
        else:
            self.transform = v2.Compose([v2.Resize((300, 300), antialias=True), *mean_std])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        im = self.images[i]
        img = decode_jpeg(read_file(str(self.image_dir / im["file_name"])))
        h, w = img.shape[-2:]
        if not self.train:
            return self.transform(img), im["id"], torch.tensor([h, w])
        anns = self.anns[im["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([self.label[a["category_id"]] for a in anns]),
        }
        img, target = self.transform(tv_tensors.Image(img), target)
        rel = target["boxes"] / torch.tensor([300, 300, 300, 300])
        enc_boxes, enc_labels = self.encoder(rel, target["labels"])
        return img.as_subclass(torch.Tensor), enc_boxes, enc_labels


def _worker_init(_):
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ measuring


def _epoch_rate(loader) -> float:
    """images/s of one full pass."""
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        images = batch["images"] if isinstance(batch, dict) else batch[0]
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images per split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5, help="timed passes per pipeline")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--data", type=Path, default=None, help="reuse/write the synthetic set here")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where DALI decodes/augments")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)

    tmp = None
    root = args.data
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        root = Path(tmp.name)
    if not (root / "annotations" / "instances_val2017.json").is_file():
        write_synthetic_coco(root, args.images, args.images, seed=0, image_size=(640, 480), num_empty=0)

    dm = COCODataModule(
        root, batch_size=args.batch_size, num_threads=args.workers, device=args.device, precision="32", seed=0
    )
    dm.setup("fit")
    dali = f"DALI {dali_version} {args.device.upper()}, num_threads={args.workers}"
    torchvision_name = f"torchvision.transforms.v2 + DataLoader, num_workers={args.workers}"
    loaders = {("train", dali): dm.train_dataloader(), ("val", dali): dm.val_dataloader()}
    for split, train in (("train", True), ("val", False)):
        ds = TorchCOCO(
            root / "images" / f"{split}2017", root / "annotations" / f"instances_{split}2017.json", train
        )
        loaders[(split, torchvision_name)] = DataLoader(
            ds,
            batch_size=args.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=args.workers,
            persistent_workers=True,
            worker_init_fn=_worker_init,
        )
    for loader in loaders.values():  # warm-up pass (pipeline build, worker start, page cache)
        _epoch_rate(loader)
    rates: dict = {key: [] for key in loaders}
    for _ in range(args.epochs):  # round-robin, so that load from other processes hits every row alike
        for key, loader in loaders.items():
            rates[key].append(_epoch_rate(loader))

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load} (1/5/15 min)")
    print(
        f"torch {torch.__version__}, {args.images} images 640x480 JPEG per split, batch {args.batch_size}, "
        f"{args.epochs} timed passes each (median, min-max)\n"
    )
    print("| split | pipeline | images/s (median) | min - max |")
    print("|---|---|---:|---:|")
    for (split, name), r in sorted(rates.items()):
        print(f"| {split} | {name} | {statistics.median(r):.0f} | {min(r):.0f} - {max(r):.0f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
