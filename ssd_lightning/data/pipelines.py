"""The DALI graphs (``fn`` API): NVIDIA SSD300 v1.1 training augmentation and the evaluation pipeline.

Both functions take explicit arguments only and return an unbuilt ``nvidia.dali.Pipeline`` whose reader is
named :data:`READER_NAME` (for ``DALIGenericIterator(reader_name=...)``).

Outputs per sample:

* train: ``images`` [3, 300, 300] float (CHW, ImageNet-normalised), ``boxes`` [8732, 4] xywh relative to the
  300x300 input (``box_encoder`` output: the matched ground truth per default box, the default box itself for
  background), ``labels`` [8732] int32 (contiguous 1..K, 0 background); optionally ``image_ids`` [1] int32.
* eval: ``images`` [3, 300, 300], ``image_ids`` [1] int32.

With ``decode_device="mixed"`` the images are decoded and processed on the GPU (``device_id``) and every
output is a GPU tensor; with ``"cpu"`` everything runs on the CPU (``device_id`` may be None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

try:  # only building a pipeline needs DALI: the data-free paths import this module on machines without it
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.pipeline import Pipeline
except ImportError as err:  # e.g. benchmark.py benchmark.input=synthetic on a GPU machine without DALI
    _NO_DALI: ImportError | None = err
else:
    _NO_DALI = None

from ssd_lightning.images import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE

__all__ = [
    "READER_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CROP_THRESHOLDS",
    "Augmentation",
    "train_pipeline",
    "eval_pipeline",
    "dali_dtype",
]

READER_NAME = "Reader"
# SSD random crop: minimum IoU with every kept box (0 = any crop); "no crop" is allow_no_crop=True.
CROP_THRESHOLDS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation and box-matching settings; the defaults are NVIDIA SSD300 v1.1's (the DALI SSD
    example, NVIDIA/DALI's ``docs/examples/use_cases/pytorch/single_stage_detector/src/coco_pipeline.py``).

    Ranges are (low, high); a range with low == high turns that jitter off. ``hue`` is in degrees (NVIDIA's
    +-0.5 is practically off). ``mean``/``std`` are per RGB channel on the 0..1 scale (also used by the
    evaluation pipeline). ``match_iou``: ``box_encoder``'s IoU for matching a default box to a ground truth.
    """

    crop_thresholds: tuple[float, ...] = CROP_THRESHOLDS  # SSD crop: minimum IoU with every kept box
    crop_scaling: tuple[float, float] = (0.3, 1.0)  # crop side / image side
    crop_aspect_ratio: tuple[float, float] = (0.5, 2.0)
    crop_attempts: int = 50
    flip_probability: float = 0.5
    brightness: tuple[float, float] = (0.875, 1.125)
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.5, 0.5)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    match_iou: float = 0.5


def require_dali() -> None:
    """Raise a one-line ``ImportError`` when NVIDIA DALI is not installed (pipelines cannot be built)."""
    if _NO_DALI is not None:
        raise ImportError(
            f"NVIDIA DALI is not installed ({_NO_DALI}): pip install nvidia-dali-cuda120 "
            "(its CPU pipelines run without a GPU)"
        )


def dali_dtype(name: str) -> types.DALIDataType:
    """DALI output type of the images for ``"float32"`` / ``"float16"`` (bfloat16 is cast in torch)."""
    return {"float32": types.FLOAT, "float16": types.FLOAT16}[name]


def _uniform(bounds: Sequence[float]):
    """A per-sample uniform draw from [low, high), or the constant when low == high (jitter off)."""
    low, high = float(bounds[0]), float(bounds[1])
    return low if low == high else fn.random.uniform(range=[low, high])


def _annotation_source(annotation_file: str, preprocessed: str | None, **parsing) -> dict:
    """The reader's annotation arguments: the JSON file with how to parse it (relative ltrb boxes and
    ``parsing``), or a folder of preprocessed files, which hold the parsed values (DALI refuses parsing
    arguments with them)."""
    if preprocessed is not None:
        return {"preprocessed_annotations": preprocessed}
    return {"annotations_file": annotation_file, "ratio": True, "ltrb": True, **parsing}


def _normalize(images, mean: Sequence[float], std: Sequence[float], dtype: str, mirror=None):
    return fn.crop_mirror_normalize(
        images,
        crop=(INPUT_SIZE, INPUT_SIZE),
        mean=[m * 255 for m in mean],
        std=[s * 255 for s in std],
        mirror=mirror if mirror is not None else 0,
        dtype=dali_dtype(dtype),
        output_layout="CHW",
    )


def train_pipeline(
    *,
    images_dir: str,
    annotation_file: str,
    anchors_ltrb: Sequence[float],
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    shuffle_seed: int,
    shard_id: int = 0,
    num_shards: int = 1,
    decode_device: str = "cpu",
    dtype: str = "float32",
    include_crowd: bool = True,
    augmentation: Augmentation = Augmentation(),
    prefetch_queue_depth: int = 2,
    return_image_ids: bool = False,
    file_names: Sequence[str] | None = None,
    preprocessed_annotations: str | None = None,
) -> Pipeline:
    """NVIDIA SSD300 v1.1 training pipeline (the DALI SSD example's ``coco_pipeline.py`` graph, ``fn`` API).

    COCO reader (relative ltrb boxes, images without boxes skipped, the whole set re-shuffled after every
    epoch with ``shuffle_seed``, which must be equal on every shard so that the shards stay disjoint) -> SSD
    random crop (``random_bbox_crop``: a minimum IoU drawn from ``crop_thresholds`` or no crop, side scaling
    ``crop_scaling``, aspect ``crop_aspect_ratio``; boxes whose centre leaves the crop are dropped) -> ROI
    decode of the crop window only -> horizontal flip of image and boxes with ``flip_probability`` -> 300x300
    resize (anisotropic, triangular filter) -> colour jitter: ``hsv`` (hue delta in degrees, saturation
    factor) then ``brightness_contrast`` (contrast around 128) with each factor drawn uniformly from its range
    -> ImageNet normalisation to CHW ``dtype`` -> ``box_encoder`` to the default boxes (IoU ``match_iou``).

    The settings named here are the fields of ``augmentation`` (:class:`Augmentation`). ``seed`` drives the
    augmentations (give every rank its own).

    The reader pads its shard (``pad_last_batch``), so every DALI epoch is exactly this shard of that epoch's
    global permutation (shards differ in size by at most one image); iterate with
    ``DALIGenericIterator(reader_name=READER_NAME, last_batch_policy=PARTIAL)``. ``DROP`` would let the
    shards drift into each other's images over epochs when they differ in size.

    ``file_names`` (file names as in the annotation file): read exactly these images, in this order, instead
    of the whole file re-shuffled after every epoch (``shuffle_seed`` is then unused). The data module builds
    one such pipeline per epoch, with the epoch's order and seed, so that an epoch's data does not depend on
    the epochs before it (exact resume).

    ``preprocessed_annotations``: a folder of DALI's preprocessed annotation files
    (:mod:`~ssd_lightning.data.reader_files`) to read instead of ``annotation_file``, in their order, every
    image listed there (the same samples as ``file_names``, without parsing the JSON file).
    """
    require_dali()
    gpu = decode_device == "mixed"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    def graph():
        aug = augmentation
        if preprocessed_annotations is not None:
            order = {"random_shuffle": False}
        elif file_names is None:
            order = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed}
        else:
            order = {"images": list(file_names), "random_shuffle": False}
        outputs = fn.readers.coco(
            file_root=images_dir,
            **_annotation_source(
                annotation_file, preprocessed_annotations, skip_empty=True, include_iscrowd=include_crowd
            ),
            **order,
            pad_last_batch=True,
            shard_id=shard_id,
            num_shards=num_shards,
            image_ids=return_image_ids,
            name=READER_NAME,
        )
        jpegs, boxes, labels = outputs[:3]
        crop_begin, crop_size, boxes, labels = fn.random_bbox_crop(
            boxes,
            labels,
            device="cpu",
            aspect_ratio=list(aug.crop_aspect_ratio),
            thresholds=list(aug.crop_thresholds),
            scaling=list(aug.crop_scaling),
            bbox_layout="xyXY",
            allow_no_crop=True,
            num_attempts=aug.crop_attempts,
        )
        images = fn.decoders.image_slice(
            jpegs,
            crop_begin,
            crop_size,
            device=decode_device,
            output_type=types.RGB,
            adjust_orientation=False,
        )
        flip = fn.random.coin_flip(probability=aug.flip_probability)
        boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip)
        images = fn.resize(
            images, resize_x=INPUT_SIZE, resize_y=INPUT_SIZE, min_filter=types.INTERP_TRIANGULAR
        )
        images = fn.hsv(
            images,
            dtype=types.FLOAT,
            hue=_uniform(aug.hue),
            saturation=_uniform(aug.saturation),
        )
        images = fn.brightness_contrast(
            images,
            contrast_center=128,
            dtype=types.UINT8,
            brightness=_uniform(aug.brightness),
            contrast=_uniform(aug.contrast),
        )
        images = _normalize(images, aug.mean, aug.std, dtype, mirror=flip)
        boxes, labels = fn.box_encoder(boxes, labels, criteria=aug.match_iou, anchors=list(anchors_ltrb))
        if gpu:
            boxes, labels = boxes.gpu(), labels.gpu()
        if return_image_ids:
            return images, boxes, labels, outputs[3]
        return images, boxes, labels

    return graph()


def eval_pipeline(
    *,
    images_dir: str,
    annotation_file: str,
    file_names: Sequence[str] | None = None,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    decode_device: str = "cpu",
    dtype: str = "float32",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    prefetch_queue_depth: int = 2,
    preprocessed_annotations: str | None = None,
) -> Pipeline:
    """Evaluation pipeline: decode, 300x300 resize, ImageNet normalisation; yields the image ids.

    Reads exactly ``file_names`` (in that order, sharded contiguously, the shard padded with its last sample
    so that ``DALIGenericIterator(reader_name=..., last_batch_policy=PARTIAL)`` can drop the padding), every
    epoch the same shard (``stick_to_shard``), so every image is seen exactly once per epoch over all shards.
    ``preprocessed_annotations``: as in :func:`train_pipeline` (then listing ``file_names``, in that order).
    """
    require_dali()
    listed = {} if preprocessed_annotations is not None else {"images": list(file_names)}

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    def graph():
        jpegs, _boxes, _labels, image_ids = fn.readers.coco(
            file_root=images_dir,
            **_annotation_source(annotation_file, preprocessed_annotations, skip_empty=False),
            **listed,
            image_ids=True,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            stick_to_shard=True,
            random_shuffle=False,
            name=READER_NAME,
        )
        images = fn.decoders.image(
            jpegs, device=decode_device, output_type=types.RGB, adjust_orientation=False
        )
        images = fn.resize(
            images, resize_x=INPUT_SIZE, resize_y=INPUT_SIZE, min_filter=types.INTERP_TRIANGULAR
        )
        images = _normalize(images, mean, std, dtype)
        return images, image_ids

    return graph()
