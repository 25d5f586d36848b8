"""Helpers for the DALI data tests: tiny hand-made COCO sets and reading results back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ssd_lightning.images import IMAGENET_MEAN, IMAGENET_STD

GREY = (128, 128, 128)
CATEGORIES = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]
COLOURS = {3: (220, 30, 30), 7: (30, 40, 220)}


def save_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def ann_file(root: Path, split: str = "train") -> Path:
    return root / "annotations" / f"instances_{split}2017.json"


def image_dir(root: Path, split: str = "train") -> Path:
    return root / "images" / f"{split}2017"


def boxes_image(
    width: int, height: int, objects: list[tuple[int, tuple[int, int, int, int]]], mode: str = "RGB"
) -> Image.Image:
    """Grey image with solid rectangles; ``objects`` = [(category id, (x, y, w, h))] in pixels."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[:] = GREY
    for cat, (x, y, w, h) in objects:
        arr[y : y + h, x : x + w] = COLOURS[cat]
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def write_boxes_set(
    root: Path,
    images: list[tuple[int, list[tuple[int, tuple[int, int, int, int]]]]],
    size: tuple[int, int] = (200, 160),
    split: str = "train",
    fmt: str = "JPEG",
    mode: str = "RGB",
) -> Path:
    """A split of rectangle images: ``images`` = [(image id, objects)]; boxes are exact (x, y, w, h)."""
    width, height = size
    imgs, anns = [], []
    image_dir(root, split).mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for image_id, objects in images:
        name = f"{image_id:06d}.{ext}"
        img = boxes_image(width, height, objects, mode)
        img.save(
            image_dir(root, split) / name,
            format=fmt,
            **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}),
        )
        imgs.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for cat, (x, y, w, h) in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    save_json(ann_file(root, split), {"images": imgs, "annotations": anns, "categories": CATEGORIES})
    return root


def denormalize(images) -> np.ndarray:
    """[N, 3, H, W] normalised tensor -> [N, H, W, 3] float RGB in 0..1."""
    arr = images.float().cpu().numpy().transpose(0, 2, 3, 1)
    return arr * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)


def run_pipeline(pipe, iterations: int = 1) -> list[list[np.ndarray]]:
    """Build and run a DALI pipeline; returns per iteration a list of outputs as numpy batches (lists)."""
    pipe.build()
    out = []
    for _ in range(iterations):
        res = pipe.run()
        out.append([[np.asarray(t.as_cpu().at(i)) for i in range(len(t))] for t in res])
    return out
