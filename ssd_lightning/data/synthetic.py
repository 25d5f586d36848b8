"""A small synthetic COCO-format detection set: coloured shapes on cluttered backgrounds.

Used by the tests, the benchmarks and ``experiment=quickstart``. The set is learnable in minutes on a CPU: a
few classes of distinct shapes in distinct colours, 1-4 objects per image covering 15-60 % of the image side,
on a lower-contrast cluttered background. It exercises what real COCO files do: JPEG images of varied sizes,
non-contiguous category ids (3, 7, 11, ...), non-contiguous image ids and a few images without annotations.

Layout written (the ``images/`` + ``annotations/`` layout, :mod:`ssd_lightning.data.layout`)::

    root/images/train2017/*.jpg    root/annotations/instances_train2017.json
    root/images/val2017/*.jpg      root/annotations/instances_val2017.json

Everything is deterministic given the arguments (same numpy + Pillow versions give byte-identical files).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ssd_lightning.errors import DataError
from ssd_lightning.fileio import write_json_atomic

__all__ = ["SYNTHETIC_CLASSES", "write_synthetic_coco", "ensure_synthetic_coco", "is_synthetic_complete"]

# (category id, name, shape, RGB colour). Ids are deliberately non-contiguous.
SYNTHETIC_CLASSES: tuple[tuple[int, str, str, tuple[int, int, int]], ...] = (
    (3, "red_rectangle", "rectangle", (220, 40, 40)),
    (7, "green_ellipse", "ellipse", (40, 190, 60)),
    (11, "blue_triangle", "triangle", (40, 70, 220)),
    (15, "yellow_cross", "cross", (235, 215, 40)),
    (19, "magenta_diamond", "diamond", (210, 50, 210)),
)

MARKER = ".synthetic_complete"
_DESCRIPTION = "ssd_lightning synthetic shapes"


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Low-contrast clutter: a greyish gradient, faint blobs and lines, mild noise."""
    base = rng.uniform(90, 160, size=3)
    tint = rng.uniform(-25, 25, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx / max(width - 1, 1) * math.cos(rng.uniform(0, math.pi)) + yy / max(height - 1, 1)) / 2
    arr = base[None, None, :] + tint[None, None, :] * ramp[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(15, 35))):
        grey = rng.uniform(70, 180)
        colour = tuple(int(np.clip(grey + rng.uniform(-20, 20), 0, 255)) for _ in range(3))
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        size = rng.uniform(0.02, 0.12) * min(width, height)
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + size, y0 + size * rng.uniform(0.5, 2)], fill=colour)
        else:
            x1, y1 = x0 + rng.uniform(-0.3, 0.3) * width, y0 + rng.uniform(-0.3, 0.3) * height
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 4)))
    img = img.filter(ImageFilter.GaussianBlur(radius=1.0))
    noise = rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def _shape_polygon(shape: str, x: float, y: float, w: float, h: float) -> list[tuple[float, float]]:
    """Outline of a shape filling the box (x, y, w, h) tightly (every side touches the box)."""
    if shape == "rectangle":
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if shape == "triangle":
        return [(x + w / 2, y), (x + w, y + h), (x, y + h)]
    if shape == "diamond":
        return [(x + w / 2, y), (x + w, y + h / 2), (x + w / 2, y + h), (x, y + h / 2)]
    if shape == "cross":
        a, b = w / 3, h / 3
        return [
            (x + a, y), (x + 2 * a, y), (x + 2 * a, y + b), (x + w, y + b), (x + w, y + 2 * b),
            (x + 2 * a, y + 2 * b), (x + 2 * a, y + h), (x + a, y + h), (x + a, y + 2 * b),
            (x, y + 2 * b), (x, y + b), (x + a, y + b),
        ]  # fmt: skip
    if shape == "ellipse":
        n = 24
        cx, cy = x + w / 2, y + h / 2
        return [
            (cx + w / 2 * math.cos(2 * math.pi * k / n), cy + h / 2 * math.sin(2 * math.pi * k / n))
            for k in range(n)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over the smaller box's area (xywh boxes): 1.0 when one contains the other."""
    ax1, ay1, ax2, ay2 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    bx1, by1, bx2, by2 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def _draw_objects(
    rng: np.random.Generator,
    img: Image.Image,
    classes: Sequence[tuple[int, str, str, tuple[int, int, int]]],
    num_objects: int,
    object_scale: tuple[float, float],
) -> list[tuple[int, list[float], float, list[float]]]:
    """Draw up to ``num_objects`` shapes; returns (category id, bbox xywh, area, polygon) per drawn shape."""
    width, height = img.size
    draw = ImageDraw.Draw(img)
    placed: list[tuple[int, list[float], float, list[float]]] = []
    side = min(width, height)
    for _ in range(num_objects):
        for _attempt in range(20):
            cat_id, _name, shape, colour = classes[int(rng.integers(len(classes)))]
            w = int(round(rng.uniform(*object_scale) * side * rng.uniform(0.8, 1.25)))
            h = int(round(rng.uniform(*object_scale) * side * rng.uniform(0.8, 1.25)))
            w, h = min(max(w, 8), width - 2), min(max(h, 8), height - 2)
            x = int(rng.integers(0, width - w))
            y = int(rng.integers(0, height - h))
            box = [float(x), float(y), float(w), float(h)]
            if all(_overlap(box, other[1]) < 0.25 for other in placed):
                break
        else:
            continue
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True))
        # Draw into pixels [x, x+w) x [y, y+h): PIL's polygon includes its last pixel row/column.
        poly = _shape_polygon(shape, x, y, w - 1, h - 1)
        draw.polygon(poly, fill=fill, outline=tuple(max(c - 40, 0) for c in fill))
        area = {"rectangle": 1.0, "ellipse": math.pi / 4, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}[
            shape
        ]
        flat = [round(float(v), 2) for p in poly for v in p]
        placed.append((cat_id, box, round(area * w * h, 2), flat))
    return placed


def _write_split(
    root: Path,
    split: str,
    num_images: int,
    num_empty: int,
    rng: np.random.Generator,
    classes: Sequence[tuple[int, str, str, tuple[int, int, int]]],
    image_size: tuple[int, int] | None,
    size_range: tuple[int, int],
    objects_per_image: tuple[int, int],
    object_scale: tuple[float, float],
    first_image_id: int,
    jpeg_quality: int,
) -> None:
    image_dir = root / "images" / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    empty = set(rng.choice(num_images, size=min(num_empty, num_images), replace=False).tolist())
    ann_id = 1 if split == "train" else 500_001
    for i in range(num_images):
        image_id = first_image_id + 2 * i  # non-contiguous image ids
        if image_size is not None:
            width, height = image_size
        else:
            width, height = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        img = _background(rng, width, height)
        objects = []
        if i not in empty:
            objects = _draw_objects(
                rng, img, classes, int(rng.integers(*objects_per_image, endpoint=True)), object_scale
            )
        file_name = f"{image_id:012d}.jpg"
        img.save(image_dir / file_name, format="JPEG", quality=jpeg_quality)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for cat_id, box, area, poly in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat_id,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": [poly],
                }
            )
            ann_id += 1
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _s, _c in classes]
    doc = {
        "info": {"description": _DESCRIPTION, "version": "1.0", "year": 2024},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    write_json_atomic(root / "annotations" / f"instances_{split}2017.json", doc)


def write_synthetic_coco(
    root: str | os.PathLike,
    num_train: int,
    num_val: int,
    seed: int = 0,
    num_classes: int = 3,
    image_size: tuple[int, int] | None = None,
    size_range: tuple[int, int] = (256, 400),
    objects_per_image: tuple[int, int] = (1, 4),
    object_scale: tuple[float, float] = (0.15, 0.6),
    num_empty: int | None = None,
    jpeg_quality: int = 90,
) -> Path:
    """Write a synthetic COCO-format detection set under ``root`` (``images/`` + ``annotations/`` layout);
    return ``root``.

    Args:
        root: output folder; ``images/{train2017,val2017}`` and ``annotations/instances_{train,val}2017.json``
            are created in it (existing files of the same names are overwritten).
        num_train, num_val: number of images per split.
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.
        num_classes: 1..5 classes from :data:`SYNTHETIC_CLASSES` (category ids 3, 7, 11, 15, 19).
        image_size: fixed (width, height) for every image, else each side is drawn from ``size_range``.
        objects_per_image: inclusive range of shapes per non-empty image.
        object_scale: range of an object's side as a fraction of the shorter image side.
        num_empty: images per split without annotations (default: about 5 %, at least 1 when the split has
            4 images or more).
        jpeg_quality: JPEG quality of the written images.
    """
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(SYNTHETIC_CLASSES)}, got {num_classes}")
    root = Path(root)
    classes = SYNTHETIC_CLASSES[:num_classes]
    rng = np.random.default_rng(seed)
    common = dict(
        classes=classes,
        image_size=tuple(image_size) if image_size is not None else None,
        size_range=tuple(size_range),
        objects_per_image=tuple(objects_per_image),
        object_scale=tuple(object_scale),
        jpeg_quality=jpeg_quality,
    )
    for split, n, first_id in (("train", num_train, 1), ("val", num_val, 1_000_000)):
        empty = num_empty if num_empty is not None else (max(1, round(0.05 * n)) if n >= 4 else 0)
        _write_split(root, split, n, empty, rng, first_image_id=first_id, **common)
    return root


def _marker_text(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=list)


def is_synthetic_complete(root: str | os.PathLike, **params) -> bool:
    """Whether ``root`` holds a complete synthetic set written with exactly these arguments."""
    marker = Path(root) / MARKER
    return marker.is_file() and marker.read_text() == _marker_text(params)


def ensure_synthetic_coco(
    root: str | os.PathLike, num_train: int, num_val: int, seed: int = 0, **kwargs
) -> Path:
    """Write the synthetic set under ``root`` unless a complete one with the same arguments is already there.

    A marker file is written last, so an interrupted write is redone on the next call. Refuses
    (``ValueError``) to overwrite annotation files that were not written by this generator.
    """
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "seed": seed, **kwargs}
    if is_synthetic_complete(root, **params):
        return root
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}2017.json"
        if ann.is_file():
            try:
                ours = json.loads(ann.read_text()).get("info", {}).get("description") == _DESCRIPTION
            except (ValueError, OSError, AttributeError):
                ours = False
            if not ours:
                raise ValueError(
                    f"{ann} exists and is not a synthetic annotation file; refusing to overwrite it: "
                    "point data.root at an empty or synthetic folder"
                )
    (root / MARKER).unlink(missing_ok=True)
    write_synthetic_coco(root, num_train, num_val, seed=seed, **kwargs)
    (root / MARKER).write_text(_marker_text(params))
    return root


def ensure_synthetic_coco_on_rank(
    root: str | os.PathLike, rank: int, timeout_s: float = 1800.0, **params: Any
) -> Path:
    """:func:`ensure_synthetic_coco` by global rank 0 only; every other rank waits for its marker file.

    The one way the project writes the synthetic set (``experiment=quickstart``'s ``synthetic:`` and the data
    module's ``synthetic=`` argument alike), so that DDP ranks never write the same files at once.

    Raises:
        DataError: the folder holds annotation files this generator did not write, or rank 0 did not finish
            within ``timeout_s``.
    """
    if rank == 0:
        try:
            return ensure_synthetic_coco(root, **params)
        except ValueError as e:
            raise DataError(str(e)) from None
    deadline = time.monotonic() + timeout_s
    while not is_synthetic_complete(root, **params):
        if time.monotonic() > deadline:
            raise DataError(f"rank 0 did not finish writing the synthetic data set in {root}")
        time.sleep(1.0)
    return Path(root)
