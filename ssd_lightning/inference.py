"""Inference outside training: ``predict.py`` (pictures in; drawn boxes and COCO results out) and
``export.py`` (ONNX, TorchScript or ``torch.export`` files of the network, verified against PyTorch before
success is reported), plus the class metadata of NVIDIA DeepLearningExamples checkpoints.

Preprocessing is the validation pipeline's (``ssd_lightning.data.pipelines.eval_pipeline``), not NVIDIA's
hub helpers' (those resize the short side, centre-crop and normalise with ``(x*256-128)/128``, which is not
what the network was trained on: reference section 9). Each image is decoded with PIL to RGB (grayscale,
palette, CMYK, 16-bit and alpha images included; no EXIF rotation, as DALI's ``adjust_orientation=False``),
squash-resized to 300x300 (bilinear with antialiasing, uint8 result, as DALI's triangular-filter resize),
then normalised with the ImageNet mean/std. PIL rather than DALI because DALI aborts the whole pipeline on
one corrupt file without naming it; here an unreadable file is reported by name and skipped.

Box formats: ``SSD300.detect`` gives ltrb relative to the 300x300 input; the results JSON holds COCO
``[x, y, w, h]`` in pixels of the original image (exact, since the resize is a squash).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig

from ssd_lightning.checkpoints import CheckpointError, LoadedCheckpoint, load_model, read_checkpoint
from ssd_lightning.cli import ConfigError
from ssd_lightning.model import SSD300

__all__ = [
    "COCO2017_CATEGORY_IDS",
    "COCO2017_CLASS_NAMES",
    "EXPORT_FORMATS",
    "Categories",
    "ExportError",
    "PredictResult",
    "checkpoint_categories",
    "draw_detections",
    "export",
    "export_model",
    "list_inputs",
    "predict",
    "preprocess",
    "read_image",
    "resolve_device",
]

log = logging.getLogger("ssd_lightning")

INPUT_SIZE = 300
#: The 80 COCO 2017 category ids in sorted order (1..90 with gaps): the dataset ids of labels 1..80 of an
#: 81-class model whose checkpoint does not name them (NVIDIA's checkpoints).
COCO2017_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
    *range(84, 91),
)  # fmt: skip
#: COCO 2017 category names in the order of :data:`COCO2017_CATEGORY_IDS`.
COCO2017_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

DETECTIONS_FILE = "detections.json"
IMAGES_FILE = "images.json"
DRAWINGS_DIR = "images"

# format -> file suffix
EXPORT_FORMATS: dict[str, str] = {
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
    "exported_program": ".pt2",
}
METADATA_FILE = "ssd_lightning.json"  # extra file in TorchScript / torch.export archives


# ----------------------------------------------------------------------------------------------------------
# Classes of a checkpoint
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Categories:
    """Dataset category id and name of each label 1..C-1 (``ids[i]``/``names[i]`` belong to label ``i+1``)."""

    ids: list[int]
    names: list[str]

    def coco(self) -> list[dict[str, Any]]:
        """COCO ``categories`` entries."""
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names, strict=True)]


def checkpoint_categories(ckpt: LoadedCheckpoint) -> Categories:
    """Category ids and names of labels 1..C-1 for the model of ``ckpt``.

    Ids: the checkpoint's (train.py), else the COCO 2017 ids for an 81-class model (NVIDIA's checkpoints carry
    none), else the contiguous labels 1..C-1. Names: the checkpoint's (train.py ``class_names`` or NVIDIA
    ``label_map``), else the COCO names for an 81-class model without ids of its own, else ``class <label>``.

    Raises:
        CheckpointError: ids or names that do not number ``num_classes - 1``.
    """
    count = ckpt.num_classes - 1
    coco = ckpt.num_classes == len(COCO2017_CATEGORY_IDS) + 1 and ckpt.category_ids is None
    ids = ckpt.category_ids if ckpt.category_ids is not None else (COCO2017_CATEGORY_IDS if coco else None)
    ids = list(range(1, count + 1)) if ids is None else [int(i) for i in ids]
    names = ckpt.class_names if ckpt.class_names is not None else (COCO2017_CLASS_NAMES if coco else None)
    names = [f"class {i}" for i in range(1, count + 1)] if names is None else [str(n) for n in names]
    for what, values in (("category ids", ids), ("class names", names)):
        if len(values) != count:
            raise CheckpointError(
                f"the checkpoint's model has {ckpt.num_classes} classes (background included) but "
                f"{len(values)} {what} for labels 1..{count}: the checkpoint is inconsistent"
            )
    return Categories(ids=ids, names=names)


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


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


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to RGB: uint8 ``[3, H, W]``.

    Any mode PIL reads is converted to RGB (grayscale, palette, CMYK; alpha is dropped as DALI drops it;
    16-bit grayscale scaled to 8 bits). EXIF orientation is not applied (as the validation pipeline). Raises
    PIL's or the OS's error for a file that is not a readable image.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            gray = np.asarray(img).astype(np.float64) / 257.0
            rgb = np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        else:
            rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """The validation preprocessing: uint8 RGB ``[(N,) 3, H, W]`` -> float32 ``[(N,) 3, 300, 300]``.

    Squash-resize to 300x300 (bilinear, antialiased, rounded to uint8 as DALI's resize of a uint8 image), then
    ``(x / 255 - mean) / std`` with the ImageNet mean/std of the DALI pipelines.
    """
    from torchvision.transforms.v2 import functional as F

    from ssd_lightning.data.pipelines import IMAGENET_MEAN, IMAGENET_STD

    if images.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 RGB images, got {images.dtype}")
    resized = F.resize(
        images, [INPUT_SIZE, INPUT_SIZE], interpolation=F.InterpolationMode.BILINEAR, antialias=True
    )
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (resized.float() / 255.0 - mean) / std


def _palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct saturated colours (golden-angle hues)."""
    import colorsys

    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0))
        for i in range(count)
    ]  # type: ignore[misc]


def draw_detections(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[int],
    scores: Sequence[float],
    categories: Categories,
) -> torch.Tensor:
    """``image`` (uint8 ``[3, H, W]``) with ``boxes`` (``[K, 4]`` ltrb pixels) drawn, captioned
    ``<class name> <score>``, one colour per class (label 1..C-1)."""
    from torchvision.utils import draw_bounding_boxes

    if len(boxes) == 0:
        return image
    palette = _palette(len(categories.names))
    captions = [f"{categories.names[int(c) - 1]} {float(s):.2f}" for c, s in zip(labels, scores, strict=True)]
    colors = [palette[int(c) - 1] for c in labels]
    width = max(1, round(max(image.shape[1:]) / 300))
    return draw_bounding_boxes(
        image, boxes, labels=captions, colors=colors, width=width, fill_labels=True, label_colors="black"
    )


# ----------------------------------------------------------------------------------------------------------
# predict.py
# ----------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto``: the accelerator Lightning would pick (CUDA, else Apple MPS, else CPU), or a device name."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible: use device=auto or device=cpu")
    return device


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
        from PIL import UnidentifiedImageError

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
    categories: Categories
    detections_file: Path
    images_file: Path
    drawings_dir: Path | None


def _save_drawing(
    path: Path, image: torch.Tensor, rows: list[dict[str, Any]], categories: Categories
) -> None:
    from PIL import Image

    label_of = {cid: i + 1 for i, cid in enumerate(categories.ids)}
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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def predict(cfg: DictConfig) -> PredictResult:
    """``predict.py``: detect objects in the images of ``cfg.input`` with the model of ``cfg.ckpt_path``.

    Writes to ``cfg.paths.output_dir``: ``detections.json`` (COCO results: ``image_id``, ``category_id``,
    ``bbox`` [x, y, w, h] in original pixels, ``score``), ``images.json`` (COCO ``images`` entries with the
    file each id stands for, the ``categories``, and the skipped files) and, with ``save_images``, one PNG per
    image under ``images/`` with the boxes, class names and scores drawn. Unreadable files are reported and
    skipped.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ssd_lightning.evaluation import detections_to_coco, write_json_atomic
    from ssd_lightning.summary import model_summary

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
                        [ids[item.index]], [size], [det], categories.ids, clip=bool(cfg.clip_boxes)
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


# ----------------------------------------------------------------------------------------------------------
# export.py
# ----------------------------------------------------------------------------------------------------------


class ExportError(ConfigError):
    """An exported file that does not reproduce the PyTorch model (one-line message)."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    tolerance: float
    check_batch: int


def _metadata(ckpt: LoadedCheckpoint, categories: Categories) -> dict[str, Any]:
    from ssd_lightning.data.pipelines import IMAGENET_MEAN, IMAGENET_STD

    return {
        "model": "SSD300",
        "backbone": ckpt.backbone,
        "num_classes": ckpt.num_classes,
        "category_ids": categories.ids,
        "class_names": categories.names,
        "input": "images float32 [N,3,300,300]: RGB squash-resized to 300x300, (x/255 - mean) / std",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "outputs": "locs [N,4,8732] (xywh offsets, scale 0.1/0.2), confs [N,num_classes,8732] (logits)",
        "default_boxes": "ssd_lightning.boxes.ssd300_default_boxes()",
    }


@contextlib.contextmanager
def _quiet_export_warnings() -> Iterator[None]:
    """Silence the exporters' deprecation notices (legacy ONNX exporter, ``torch.jit``), tracer warnings."""
    with warnings.catch_warnings():
        for pattern in (
            r".*legacy TorchScript-based ONNX export.*",
            r".*feature will be removed.*",
            r".*torch\.jit\..*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _export_onnx(model: SSD300, example: torch.Tensor, path: Path, metadata: dict, opset: int) -> None:
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            "format=onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime"
        ) from None
    # The TorchScript-based exporter: the torch.export-based one (dynamo=True) needs onnxscript.
    with _quiet_export_warnings():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["locs", "confs"],
            dynamic_axes={"images": {0: "batch"}, "locs": {0: "batch"}, "confs": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _run_onnx(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "format=onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    locs, confs = session.run(["locs", "confs"], {"images": images.numpy()})
    return torch.from_numpy(locs), torch.from_numpy(confs)


def _export_torchscript(model: SSD300, example: torch.Tensor, path: Path, metadata: dict) -> None:
    with _quiet_export_warnings():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def _run_torchscript(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _quiet_export_warnings(), torch.inference_mode():
        return torch.jit.load(str(path), map_location="cpu")(images)


def _export_program(model: SSD300, example: torch.Tensor, path: Path, metadata: dict) -> None:
    if example.shape[0] == 1:  # torch.export specialises a size-1 dimension: it would not stay dynamic
        example = example.expand(2, -1, -1, -1)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def _run_program(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    module = torch.export.load(str(path)).module()
    with torch.inference_mode():
        return module(images)


def export_model(
    model: SSD300,
    path: str | os.PathLike,
    format: str = "onnx",
    *,
    metadata: dict[str, Any] | None = None,
    batch_size: int = 2,
    opset: int = 17,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` (eval mode, CPU, float32) to ``path`` and check the file against PyTorch.

    The network only: input ``images [N, 3, 300, 300]`` (``N`` dynamic), outputs ``locs [N, 4, 8732]`` and
    ``confs [N, C, 8732]`` as :meth:`SSD300.forward`; post-process with ``ssd_lightning.postprocess``. The
    file is traced at batch ``batch_size`` and checked on a random batch of ``batch_size + 1`` images (so the
    dynamic batch is checked too): ``max|exported - torch| <= atol + rtol * max|torch|``. It is written under
    a temporary name and renamed only when the check passes.

    Raises:
        ConfigError: an unknown format, missing onnx/onnxruntime.
        ExportError: the exported file does not reproduce the model.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format={format}: unknown export format; use one of {', '.join(EXPORT_FORMATS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be at least 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(batch_size, 3, INPUT_SIZE, INPUT_SIZE, generator=generator)
    check = torch.randn(batch_size + 1, 3, INPUT_SIZE, INPUT_SIZE, generator=generator)
    metadata = metadata or {}
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")  # same suffix: torch.export wants .pt2
    try:
        if format == "onnx":
            _export_onnx(model, example, tmp, metadata, opset)
            got = _run_onnx(tmp, check)
        elif format == "torchscript":
            _export_torchscript(model, example, tmp, metadata)
            got = _run_torchscript(tmp, check)
        else:
            _export_program(model, example, tmp, metadata)
            got = _run_program(tmp, check)
        with torch.inference_mode():
            want = model(check)
        if [tuple(g.shape) for g in got] != [tuple(w.shape) for w in want]:
            raise ExportError(
                f"the {format} file gives shapes {[list(g.shape) for g in got]} for a batch of "
                f"{batch_size + 1}, PyTorch {[list(w.shape) for w in want]}: the batch dimension is not "
                "dynamic"
            )
        diff = max(float((g.float() - w).abs().max()) for g, w in zip(got, want, strict=True))
        scale = max(float(w.abs().max()) for w in want)
        tolerance = atol + rtol * scale
        if not math.isfinite(diff) or diff > tolerance:
            raise ExportError(
                f"the {format} file differs from PyTorch by up to {diff:.3g} (tolerance {tolerance:.3g}) on "
                "random input: not written; try another opset (opset=...) or format"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path, format, diff, tolerance, batch_size + 1)


def export(cfg: DictConfig) -> ExportResult:
    """``export.py``: export the model of ``cfg.ckpt_path`` to ``cfg.format`` and verify it (see
    :func:`export_model`). The file goes to ``cfg.output`` or ``<run dir>/ssd300_<backbone><suffix>``."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        raise ConfigError("export.py needs ckpt_path=CHECKPOINT (a train.py .ckpt or an NVIDIA .pt file)")
    fmt = str(cfg.format)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"format={fmt}: unknown export format; use one of {', '.join(EXPORT_FORMATS)}")
    ckpt = read_checkpoint(ckpt_path)
    categories = checkpoint_categories(ckpt)
    model = load_model(ckpt_path)
    output = cfg.get("output") or Path(cfg.paths.output_dir) / f"ssd300_{ckpt.backbone}{EXPORT_FORMATS[fmt]}"
    print(f"SSD300(backbone={ckpt.backbone}, num_classes={ckpt.num_classes}) from {ckpt_path}", flush=True)
    result = export_model(
        model,
        output,
        fmt,
        metadata=_metadata(ckpt, categories),
        batch_size=int(cfg.batch_size),
        opset=int(cfg.opset),
        atol=float(cfg.atol),
        rtol=float(cfg.rtol),
        seed=int(cfg.seed),
    )
    runtime = {
        "onnx": "onnxruntime",
        "torchscript": "torch.jit.load",
        "exported_program": "torch.export.load",
    }[fmt]
    print(
        f"exported {result.path} ({fmt}, dynamic batch); checked with {runtime} against PyTorch on random "
        f"input [{result.check_batch},3,300,300]: max abs difference {result.max_abs_diff:.3g} "
        f"(tolerance {result.tolerance:.3g})",
        flush=True,
    )
    return result
