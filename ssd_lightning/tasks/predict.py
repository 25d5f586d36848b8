"""``predict.py``: pictures in; drawn boxes and COCO results out, through Lightning's ``trainer.predict``.

The model is a train.py or NVIDIA checkpoint's network in an ``SSDModule`` or an ``export.py`` ONNX file in an
``OnnxDetector`` (:mod:`ssd_lightning.training.prediction`); both run the same ``predict_step``
post-processing. The files come from :class:`~ssd_lightning.data.pictures.PicturesDataModule` (each rank its
own contiguous share), and ``PredictionWriter`` turns the detections into result rows and drawings on each
rank and gathers the rows, in file order, for rank 0 to write.

Preprocessing (``ssd_lightning.images``) is the validation pipeline's
(``ssd_lightning.data.pipelines.eval_pipeline``), not NVIDIA's hub helpers' (those resize the short side,
centre-crop and normalise with ``(x*256-128)/128``, which is not what the network was trained on: NVIDIA's
``PyTorch/Detection/SSD/ssd/entrypoints.py``). Each image is decoded with PIL to RGB (grayscale, palette,
CMYK, 16-bit and alpha images included; no EXIF rotation, as DALI's ``adjust_orientation=False``),
squash-resized to 300x300 (bilinear with antialiasing, uint8 result, as DALI's triangular-filter resize), then
normalised with the ImageNet mean/std. PIL rather than DALI because DALI aborts the whole pipeline on one
corrupt file without naming it; here an unreadable file is reported by name and skipped.

Box formats: ``SSD300.detect`` gives ltrb relative to the 300x300 input; the results JSON holds COCO
``[x, y, w, h]`` in pixels of the original image (exact, since the resize is a squash).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from glob import glob, has_magic
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, ListConfig, open_dict

from ssd_lightning.categories import CategoryMap
from ssd_lightning.checkpoints import read_checkpoint
from ssd_lightning.checkpoints.reading import check_state_dict, checkpoint_categories
from ssd_lightning.data.pictures import PicturesDataModule
from ssd_lightning.errors import ConfigError
from ssd_lightning.fileio import write_json_atomic
from ssd_lightning.model.onnx_file import is_onnx_file
from ssd_lightning.model.summary import model_summary
from ssd_lightning.runtime.builders import build_trainer, global_rank_from_env
from ssd_lightning.runtime.ddp_sweeps import JobScope, install_ddp_sweep_support
from ssd_lightning.runtime.devices import resolve_device
from ssd_lightning.training.module import SSDModule
from ssd_lightning.training.prediction import OnnxDetector, Predictions, PredictionWriter

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
    """What :func:`predict` wrote: COCO results rows, per-image entries, skipped files and the paths
    (``per_rank``: the files each process handled; ``seconds``: the predict loops' time, see
    :class:`~ssd_lightning.training.prediction.Predictions`)."""

    detections: list[dict[str, Any]]
    images: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    categories: CategoryMap
    detections_file: Path
    images_file: Path
    drawings_dir: Path | None
    per_rank: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _thresholds(cfg: DictConfig) -> dict[str, Any]:
    """The post-processing of ``predict_step`` (``candidates_per_class``: NVIDIA's 200, as SSD300.detect)."""
    return {
        "score_threshold": float(cfg.score_threshold),
        "nms_iou_threshold": float(cfg.nms_iou_threshold),
        "max_detections": int(cfg.max_detections),
        "candidates_per_class": 200,
    }


def load_predictor(cfg: DictConfig, rank: int) -> tuple[pl.LightningModule, CategoryMap]:
    """The LightningModule that predicts with ``cfg.ckpt_path`` and its classes: an ``SSDModule`` holding a
    train.py or NVIDIA checkpoint's network, or an :class:`OnnxDetector` for an ``export.py`` ``.onnx`` file
    (classes from its metadata). Rank 0 prints what it loaded (the model summary for a checkpoint)."""
    ckpt_path = str(cfg.ckpt_path)
    if is_onnx_file(ckpt_path):
        module = OnnxDetector(ckpt_path, **_thresholds(cfg))
        categories = module.onnx.categories
        if rank == 0:
            print(
                f"SSD300(backbone={module.onnx.backbone}, num_classes={module.onnx.num_classes}) from "
                f"{ckpt_path} (ONNX, onnxruntime)",
                flush=True,
            )
        return module, categories
    ckpt = read_checkpoint(ckpt_path)
    categories = checkpoint_categories(ckpt)
    module = SSDModule(
        backbone=ckpt.backbone,
        num_classes=ckpt.num_classes,
        backbone_weights=None,
        category_ids=categories.dataset_ids,
        class_names=categories.names,
        **_thresholds(cfg),
    )
    what = f"SSD300(backbone={ckpt.backbone}, num_classes={ckpt.num_classes})"
    check_state_dict(module.model, ckpt.state_dict, f"{ckpt_path} does not match {what}")
    module.model.load_state_dict(ckpt.state_dict, strict=False)  # only num_batches_tracked may be missing
    if rank == 0:
        print(f"{what} from {ckpt_path}", flush=True)
        print(model_summary(module.model), flush=True)
    return module, categories


def _trainer_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``trainer.accelerator/devices`` from ``device=`` (unless ``auto``) and the progress bar
    from ``progress_bar``."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = bool(cfg.get("progress_bar", True))
        device = str(cfg.get("device", "auto"))
        if device != "auto":
            chosen = resolve_device(device)
            accelerator = {"cuda": "gpu"}.get(chosen.type, chosen.type)
            cfg.trainer.accelerator = accelerator
            cfg.trainer.devices = [chosen.index] if chosen.index is not None else 1
    return cfg


def _input_files(cfg: DictConfig) -> list[Path]:
    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "predict.py needs ckpt_path=CHECKPOINT (a train.py .ckpt, an NVIDIA .pt file or an export.py "
            ".onnx file)"
        )
    if not cfg.get("input"):
        raise ConfigError(
            "predict.py needs input=PATH: an image, a folder of images, a glob pattern ('dir/*.jpg') or a "
            "list of them ([a.jpg,b.png])"
        )
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be at least 1")
    specs = cfg.input if isinstance(cfg.input, (list, ListConfig)) else [cfg.input]
    return list(dict.fromkeys(f for spec in specs for f in list_inputs(spec)))  # in order, each once


def predict(cfg: DictConfig) -> PredictResult:
    """``predict.py``: detect objects in the images of ``cfg.input`` with the model of ``cfg.ckpt_path``.

    Runs Lightning's ``trainer.predict`` (``trainer.devices``, ``trainer.precision`` and DDP as in training;
    each process predicts its contiguous share of the files). Writes to ``cfg.paths.output_dir`` (rank 0):
    ``detections.json`` (COCO results: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in original
    pixels, ``score``), ``images.json`` (COCO ``images`` entries with the file each id stands for, the
    ``categories``, and the skipped files) and, with ``save_images``, one PNG per image under ``images/``
    with the boxes, class names and scores drawn (by the process that predicted it). Unreadable files are
    reported and skipped.
    """
    install_ddp_sweep_support()
    files = _input_files(cfg)
    with JobScope():
        module, categories = load_predictor(cfg, global_rank_from_env())
        module.allow_zero_length_dataloader_with_multiple_devices = True  # fewer files than processes
        output_dir = Path(cfg.paths.output_dir)
        drawings_dir = output_dir / DRAWINGS_DIR if cfg.get("save_images", True) else None
        if drawings_dir is not None:
            drawings_dir.mkdir(parents=True, exist_ok=True)
        workers = max(0, int(cfg.get("num_workers", 2)))
        writer = PredictionWriter(
            categories,
            image_ids_for(files),
            drawings_dir,
            _drawing_names(files),
            bool(cfg.clip_boxes),
            workers,
        )
        trainer = build_trainer(_trainer_config(cfg), [writer], [])
        trainer.predict(
            module,
            datamodule=PicturesDataModule(files, int(cfg.batch_size), workers),
            return_predictions=False,
        )
        found = writer.gather()
    if not found.images:
        _no_readable_image(cfg, files, found, drawings_dir, trainer.is_global_zero)
    result = PredictResult(
        found.detections,
        found.images,
        found.skipped,
        categories,
        output_dir / DETECTIONS_FILE,
        output_dir / IMAGES_FILE,
        drawings_dir,
        found.per_rank,
        found.seconds,
    )
    if trainer.is_global_zero:
        _write_results(cfg, result)
    return result


def _no_readable_image(
    cfg: DictConfig, files: list[Path], found: Predictions, drawings_dir: Path | None, rank_zero: bool
) -> None:
    """Leave nothing behind and raise the one-line ConfigError of an input without a readable image."""
    if rank_zero and drawings_dir is not None and not any(drawings_dir.iterdir()):
        drawings_dir.rmdir()
    first = found.skipped[0]
    if len(files) == 1:
        raise ConfigError(f"input={cfg.input}: {first['reason']}")
    raise ConfigError(
        f"input={cfg.input}: none of the {len(files)} files is a readable image "
        f"({Path(first['file_name']).name}: {first['reason']}; ...)"
    )


def _write_results(cfg: DictConfig, result: PredictResult) -> None:
    write_json_atomic(result.detections_file, result.detections)
    write_json_atomic(
        result.images_file,
        {
            "checkpoint": str(cfg.ckpt_path),
            "images": result.images,
            "categories": result.categories.coco(),
            "skipped": result.skipped,
            "score_threshold": float(cfg.score_threshold),
        },
        indent=2,
    )
    n, skipped = len(result.images), len(result.skipped)
    processes = f" on {len(result.per_rank)} processes {result.per_rank}" if len(result.per_rank) > 1 else ""
    print(
        f"{n} images, {len(result.detections)} detections (score > {float(cfg.score_threshold):g})"
        + (f", {skipped} file{'s' * (skipped != 1)} skipped" if skipped else "")
        + f" in {result.seconds:.2f} s ({(n + skipped) / max(result.seconds, 1e-9):.3g} images/s{processes})"
        + f": {result.detections_file}"
        + (f", drawings in {result.drawings_dir}" if result.drawings_dir is not None else ""),
        flush=True,
    )
