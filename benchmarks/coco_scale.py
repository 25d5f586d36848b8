"""A COCO-2017-sized data set of tiny images, to measure what the size of a data set costs (start-up time,
memory, annotation parsing, image checks) without the real COCO download.

Usage::

    python benchmarks/coco_scale.py OUT_DIR [--train 118287] [--val 5000] [--size 64] [--boxes 7] [--seed 0]

Writes the COCO 2017 layout (the one ``conf/data/coco.yaml`` reads with ``data.root=OUT_DIR``)::

    OUT_DIR/images/train2017/<12-digit id>.jpg       --train images
    OUT_DIR/images/val2017/<12-digit id>.jpg         --val images
    OUT_DIR/annotations/instances_train2017.json
    OUT_DIR/annotations/instances_val2017.json
    OUT_DIR/coco_scale.json                          the parameters; written last (marks a complete set)

Every image is ``--size`` x ``--size`` pixels. A few dozen distinct JPEGs (random colour blocks plus noise)
are encoded once and their bytes written round-robin, so 118k files take seconds, not minutes. Each image has
``--boxes`` boxes with integer ``[x, y, w, h]`` inside the image (so no annotation needs repairing), a
category drawn from the 80 real COCO 2017 categories (their non-contiguous ids 1..90 and names), ``area``
w*h and ``iscrowd`` 0. Image ids are 1..train for train and continue for val (unique over both splits, as in
COCO); annotation ids are unique over both splits too.

Idempotent: when OUT_DIR already holds a complete set written with the same parameters, it says so and exits.
A set written with other parameters is replaced (its image folders are removed first).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ssd_lightning.categories import COCO2017_CATEGORY_IDS, COCO2017_CLASS_NAMES

MARKER = "coco_scale.json"
DISTINCT_IMAGES = 48
WRITE_THREADS = 4

# The 80 COCO 2017 categories (ids 1..90 with gaps), as ssd_lightning knows them for NVIDIA's checkpoints
COCO2017_CATEGORIES = list(zip(COCO2017_CATEGORY_IDS, COCO2017_CLASS_NAMES, strict=True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("out_dir", type=Path, help="folder to write the set into (created)")
    p.add_argument("--train", type=int, default=118287, help="train images (COCO 2017: 118287)")
    p.add_argument("--val", type=int, default=5000, help="val images (COCO 2017: 5000)")
    p.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    p.add_argument("--boxes", type=int, default=7, help="boxes per image (COCO 2017 train: 7.3 on average)")
    p.add_argument("--seed", type=int, default=0, help="random seed (images, boxes, categories)")
    args = p.parse_args(argv)
    if args.train < 1 or args.val < 1 or args.boxes < 1:
        p.error("--train, --val and --boxes must be >= 1")
    if args.size < 8:
        p.error("--size must be >= 8")
    return args


def params_of(args: argparse.Namespace) -> dict:
    """What the marker file records; a set is reused only when these match."""
    return {"train": args.train, "val": args.val, "size": args.size, "boxes": args.boxes, "seed": args.seed}


def read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def make_jpegs(size: int, rng: np.random.Generator, count: int = DISTINCT_IMAGES) -> list[bytes]:
    """``count`` distinct size x size JPEGs: a random colour per 8x8 block plus a little noise."""
    blocks = -(-size // 8)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (blocks, blocks, 3), dtype=np.uint8)
        pixels = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))[:size, :size]
        noise = rng.integers(-16, 17, pixels.shape)
        pixels = np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def write_images(folder: Path, image_ids: range, jpegs: list[bytes]) -> None:
    """Write the JPEG bytes round-robin, a few threads at a time (file writes release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)

    def write(k: int) -> None:
        iid = image_ids[k]
        with open(folder / file_name(iid), "wb") as f:
            f.write(jpegs[iid % len(jpegs)])

    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
        for _ in pool.map(write, range(len(image_ids)), chunksize=2048):
            pass


def make_annotations(
    image_ids: range, size: int, boxes: int, first_ann_id: int, rng: np.random.Generator
) -> list[dict]:
    """``boxes`` integer boxes per image, inside the image, of 1/16 to 1/2 of its side."""
    n = len(image_ids) * boxes
    lo, hi = max(size // 16, 1), max(size // 2, 2)
    w = rng.integers(lo, hi + 1, n)
    h = rng.integers(lo, hi + 1, n)
    x = (rng.random(n) * (size - w + 1)).astype(np.int64)
    y = (rng.random(n) * (size - h + 1)).astype(np.int64)
    cat_ids = np.array([c[0] for c in COCO2017_CATEGORIES])[rng.integers(0, len(COCO2017_CATEGORIES), n)]
    img = np.repeat(np.asarray(image_ids, dtype=np.int64), boxes)
    return [
        {
            "id": first_ann_id + k,
            "image_id": iid,
            "category_id": cid,
            "bbox": [bx, by, bw, bh],
            "area": bw * bh,
            "iscrowd": 0,
        }
        for k, (iid, cid, bx, by, bw, bh) in enumerate(
            zip(img.tolist(), cat_ids.tolist(), x.tolist(), y.tolist(), w.tolist(), h.tolist(), strict=True)
        )
    ]


def write_json(path: Path, doc: dict) -> int:
    """Write ``doc`` compactly and atomically; return the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)
    return path.stat().st_size


def write_split(
    out_dir: Path,
    split: str,
    image_ids: range,
    first_ann_id: int,
    args: argparse.Namespace,
    jpegs: list[bytes],
) -> tuple[int, int]:
    """Images and annotation file of one split; returns (annotations, annotation file bytes)."""
    rng = np.random.default_rng([args.seed, 1 if split == "train" else 2])
    write_images(out_dir / "images" / f"{split}2017", image_ids, jpegs)
    images = [
        {"id": i, "file_name": file_name(i), "width": args.size, "height": args.size} for i in image_ids
    ]
    annotations = make_annotations(image_ids, args.size, args.boxes, first_ann_id, rng)
    doc = {
        "info": {"description": f"coco_scale {split} ({params_of(args)})", "version": "1.0", "year": 2017},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in COCO2017_CATEGORIES],
    }
    nbytes = write_json(out_dir / "annotations" / f"instances_{split}2017.json", doc)
    return len(annotations), nbytes


def clear_previous(out_dir: Path) -> None:
    """Forget a previous set: the marker first (an interrupted run is then never taken for complete), then
    the image folders, but only when a marker proves they were written by this script."""
    marker = out_dir / MARKER
    if marker.is_file():
        marker.unlink()
        for split in ("train2017", "val2017"):
            shutil.rmtree(out_dir / "images" / split, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    params = params_of(args)
    if read_marker(out_dir) == params:
        print(f"{out_dir}: complete set already there ({params}); nothing to do")
        return 0
    start = time.perf_counter()
    clear_previous(out_dir)
    jpegs = make_jpegs(args.size, np.random.default_rng([args.seed, 0]))
    train_ids = range(1, args.train + 1)
    val_ids = range(args.train + 1, args.train + args.val + 1)
    print(f"{out_dir}: {args.size}x{args.size} JPEGs, {len(COCO2017_CATEGORIES)} COCO 2017 categories")
    next_ann_id = 1
    for split, ids in (("train", train_ids), ("val", val_ids)):
        n_ann, nbytes = write_split(out_dir, split, ids, next_ann_id, args, jpegs)
        next_ann_id += n_ann
        print(
            f"  {split:5s} {len(ids):7d} images, {n_ann:8d} annotations, "
            f"instances_{split}2017.json {nbytes / 1e6:.1f} MB ({time.perf_counter() - start:.1f} s)"
        )
    write_json(out_dir / MARKER, params)
    print(f"  written in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
