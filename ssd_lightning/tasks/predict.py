"""``predict.py``: pictures in; drawn boxes and COCO results out.

Preprocessing is the validation pipeline's (``ssd_lightning.data.pipelines.eval_pipeline``), not NVIDIA's hub
helpers' (those resize the short side, centre-crop and normalise with ``(x*256-128)/128``, which is not what
the network was trained on: NVIDIA's ``PyTorch/Detection/SSD/ssd/entrypoints.py``). Each image is decoded with
PIL to RGB (grayscale, palette, CMYK, 16-bit and alpha images included; no EXIF rotation, as DALI's
``adjust_orientation=False``), squash-resized to 300x300 (bilinear with antialiasing, uint8 result, as DALI's
triangular-filter resize), then normalised with the ImageNet mean/std. PIL rather than DALI because DALI
aborts the whole pipeline on one corrupt file without naming it; here an unreadable file is reported by name
and skipped.

Box formats: ``SSD300.detect`` gives ltrb relative to the 300x300 input; the results JSON holds COCO
``[x, y, w, h]`` in pixels of the original image (exact, since the resize is a squash).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ssd_lightning.categories import CategoryMap
from ssd_lightning.checkpoints import load_model, read_checkpoint
from ssd_lightning.checkpoints.reading import checkpoint_categories
from ssd_lightning.errors import ConfigError
from ssd_lightning.evaluation import detections_to_coco
from ssd_lightning.fileio import atomic_write, write_json_atomic
from ssd_lightning.images import draw_detections, preprocess, read_image
from ssd_lightning.model.summary import model_summary
from ssd_lightning.runtime.devices import resolve_device

log = logging.getLogger("ssd_lightning")

DETECTIONS_FILE = "detections.json"


IMAGES_FILE = "images.json"


DRAWINGS_DIR = "images"


def list_inputs(spec: str | os.PathLike) -> list[Path]:
    """The files ``input=`` names: one file, the files of a folder (not recursive, hidden files left out,
    sorted) or the files a glob pattern matches (``**`` recursive; sorted). Files are not opened here.

    Raises:
        ConfigError: nothing there, an empty folder, a pattern that matches no file.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ConfigError(f"input={text}: the folder is empty (no image to predict)")
        return files
    if has_magic(text):
        files = sorted(Path(p) for p in glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"input={text}: the pattern matches no file")
        return files
    raise ConfigError(f"input={text}: no such file or folder (pass an image, a folder or a glob pattern)")


@dataclass
class _Decoded:
    index: int
    path: Path
    image: torch.Tensor | None = None  # uint8 [3, H, W], original
    tensor: torch.Tensor | None = None  # float32 [3, 300, 300], preprocessed
    error: str | None = None


def _decode(index: int, path: Path) -> _Decoded:
    try:
        image = read_image(path)
        return _Decoded(index, path, image, preprocess(image))
    except Exception as err:  # noqa: BLE001 - any decoding failure skips the file
        if isinstance(err, UnidentifiedImageError):
            reason = "not an image file (or a format PIL cannot read)"
        else:
            reason = f"not a readable image ({' '.join(str(err).split()) or type(err).__name__})"
        return _Decoded(index, path, error=reason)


def _batches(pool: ThreadPoolExecutor, files: Sequence[Path], batch_size: int) -> Iterator[list[_Decoded]]:
    """Decoded batches in file order; the next batch decodes (in ``pool``) while the current one is used."""

    def submit(start: int) -> list[Future]:
        return [pool.submit(_decode, i, files[i]) for i in range(start, min(start + batch_size, len(files)))]

    pending = submit(0)
    for start in range(0, len(files), batch_size):
        current, pending = pending, submit(start + batch_size)
        yield [f.result() for f in current]


def image_ids_for(files: Sequence[Path]) -> list[int]:
    """COCO image ids: the file names' numbers when every stem is a distinct integer (COCO's
    ``000000397133.jpg``), else 1..N in file order."""
    stems = [p.stem for p in files]
    if all(re.fullmatch(r"\d{1,18}", s) for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(files) + 1))


def _drawing_names(files: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per file, made unique (``<stem>_2.png`` ...) when stems repeat."""
    used: set[str] = set()
    names = []
    for path in files:
        name, n = f"{path.stem}.png", 1
        while name in used:
            n += 1
            name = f"{path.stem}_{n}.png"
        used.add(name)
        names.append(name)
    return names


@dataclass
class PredictResult:
    """What :func:`predict` wrote: COCO results rows, per-image entries, skipped files and the paths."""

    detections: list[dict[str, Any]]
    images: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    categories: CategoryMap
    detections_file: Path
    images_file: Path
    drawings_dir: Path | None


def _save_drawing(
    path: Path, image: torch.Tensor, rows: list[dict[str, Any]], categories: CategoryMap
) -> None:

    label_of = {cid: i + 1 for i, cid in enumerate(categories.dataset_ids)}
    boxes = torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)], dtype=torch.float64
    )
    drawn = draw_detections(
        image,
        boxes.reshape(-1, 4),
        [label_of[r["category_id"]] for r in rows],
        [r["score"] for r in rows],
        categories,
    )
    with atomic_write(path, "wb") as f:
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(f, format="PNG")


def predict(cfg: DictConfig) -> PredictResult:
    """``predict.py``: detect objects in the images of ``cfg.input`` with the model of ``cfg.ckpt_path``.

    Writes to ``cfg.paths.output_dir``: ``detections.json`` (COCO results: ``image_id``, ``category_id``,
    ``bbox`` [x, y, w, h] in original pixels, ``score``), ``images.json`` (COCO ``images`` entries with the
    file each id stands for, the ``categories``, and the skipped files) and, with ``save_images``, one PNG per
    image under ``images/`` with the boxes, class names and scores drawn. Unreadable files are reported and
    skipped.
    """

    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        raise ConfigError("predict.py needs ckpt_path=CHECKPOINT (a train.py .ckpt or an NVIDIA .pt file)")
    if not cfg.get("input"):
        raise ConfigError(
            "predict.py needs input=PATH: an image, a folder of images, a glob pattern ('dir/*.jpg') or a "
            "list of them ([a.jpg,b.png])"
        )
    batch_size = int(cfg.batch_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be at least 1")
    specs = cfg.input if isinstance(cfg.input, (list, ListConfig)) else [cfg.input]
    files = list(dict.fromkeys(f for spec in specs for f in list_inputs(spec)))  # in order, each once
    device = resolve_device(str(cfg.get("device", "auto")))
    ckpt = read_checkpoint(ckpt_path)
    categories = checkpoint_categories(ckpt)
    model = load_model(ckpt_path, map_location=device)
    print(f"SSD300(backbone={ckpt.backbone}, num_classes={ckpt.num_classes}) from {ckpt_path} on {device}")
    print(model_summary(model), flush=True)

    output_dir = Path(cfg.paths.output_dir)
    drawings_dir = output_dir / DRAWINGS_DIR if cfg.get("save_images", True) else None
    if drawings_dir is not None:
        drawings_dir.mkdir(parents=True, exist_ok=True)
    ids = image_ids_for(files)
    names = _drawing_names(files)
    detections: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    workers = max(1, int(cfg.get("num_workers", 2)))
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="predict") as pool,
        logging_redirect_tqdm(),
        tqdm(total=len(files), unit="img", desc="predict", disable=not cfg.get("progress_bar", True)) as bar,
    ):
        saving: list[Future] = []
        for batch in _batches(pool, files, batch_size):
            for item in batch:
                if item.error is not None:
                    log.warning("skipped %s: %s", item.path, item.error)
                    skipped.append({"file_name": str(item.path), "reason": item.error})
            good = [item for item in batch if item.error is None]
            if good:
                with torch.inference_mode():
                    found = model.detect(
                        torch.stack([item.tensor for item in good]).to(device),
                        score_threshold=float(cfg.score_threshold),
                        iou_threshold=float(cfg.nms_iou_threshold),
                        max_detections=int(cfg.max_detections),
                    )
                sizes = [tuple(item.image.shape[1:]) for item in good]  # (height, width)
                for item, size, det in zip(good, sizes, found, strict=True):
                    rows = detections_to_coco(
                        [ids[item.index]], [size], [det], categories.dataset_ids, clip=bool(cfg.clip_boxes)
                    )
                    detections.extend(rows)
                    entry = {
                        "id": ids[item.index],
                        "file_name": str(item.path),
                        "height": size[0],
                        "width": size[1],
                        "detections": len(rows),
                    }
                    if drawings_dir is not None:
                        entry["drawing"] = f"{DRAWINGS_DIR}/{names[item.index]}"
                        target = drawings_dir / names[item.index]
                        saving.append(pool.submit(_save_drawing, target, item.image, rows, categories))
                    images.append(entry)
            bar.update(len(batch))
            while len(saving) > 2 * workers:  # bounded memory: wait for the oldest drawings
                saving.pop(0).result()
        for future in saving:
            future.result()

    if not images:
        if drawings_dir is not None and not any(drawings_dir.iterdir()):
            drawings_dir.rmdir()  # leave nothing behind
        first = skipped[0]
        if len(files) == 1:
            raise ConfigError(f"input={cfg.input}: {first['reason']}")
        raise ConfigError(
            f"input={cfg.input}: none of the {len(files)} files is a readable image "
            f"({Path(first['file_name']).name}: {first['reason']}; ...)"
        )
    detections_file = output_dir / DETECTIONS_FILE
    images_file = output_dir / IMAGES_FILE
    write_json_atomic(detections_file, detections)
    write_json_atomic(
        images_file,
        {
            "checkpoint": str(ckpt_path),
            "images": images,
            "categories": categories.coco(),
            "skipped": skipped,
            "score_threshold": float(cfg.score_threshold),
        },
        indent=2,
    )
    print(
        f"{len(images)} images, {len(detections)} detections (score > {float(cfg.score_threshold):g})"
        + (f", {len(skipped)} file{'s' * (len(skipped) != 1)} skipped" if skipped else "")
        + f": {detections_file}"
        + (f", drawings in {drawings_dir}" if drawings_dir is not None else ""),
        flush=True,
    )
    return PredictResult(detections, images, skipped, categories, detections_file, images_file, drawings_dir)
