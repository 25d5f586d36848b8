"""COCODataModule: NVIDIA DALI pipelines for COCO-format detection data inside a LightningDataModule.

One pipeline per process (rank): ``shard_id=global_rank``, ``num_shards=world_size``, ``device_id`` = the
rank's CUDA device (or None on CPU). The iterables returned by the ``*_dataloader`` methods wrap
``DALIGenericIterator(reader_name=...)`` and yield dicts:

* train: ``images`` [N, 3, 300, 300] float32 (float16 / bfloat16 when the trainer precision is 16 / bf16),
  ``boxes`` [N, 8732, 4] float32 xywh relative (``box_encoder`` output), ``labels`` [N, 8732] int64
  (contiguous 1..K, 0 background). Every batch is full (N = ``batch_size``) and every rank yields the same
  number of batches per epoch, ``len(loader)`` = floor(floor(images / ranks) / batch_size); the set is
  re-shuffled globally every epoch and the ranks read disjoint shards of it. Epoch ``e``'s order and
  augmentation depend only on ``seed`` and ``e`` (one pipeline per epoch): a resumed run repeats the
  uninterrupted run's data exactly.
* val / test / predict: ``images`` [N, 3, 300, 300], ``image_ids`` [N] int64, ``image_sizes`` [N, 2] int64
  (height, width of the original image, from the annotation file). Over all ranks every image of
  ``val_image_ids`` is yielded exactly once per epoch (padding samples are never yielded; ranks may differ by
  one batch). Each ``iter()`` starts a fresh epoch, also after a partially consumed one (Lightning's sanity
  check, ``limit_val_batches``): the pipeline is rebuilt then, since DALI cannot reset mid-epoch.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssd_lightning.boxes import ssd300_default_boxes
from ssd_lightning.categories import CategoryMap
from ssd_lightning.data.annotations import warn_sanitised
from ssd_lightning.data.index import (
    AnnotationIndex,
    check_shared_categories,
    ensure_images_checked,
    load_index,
    writable_cache_dir,
)
from ssd_lightning.data.layout import resolve_split_paths
from ssd_lightning.data.loaders import EvalLoader, TrainLoader, _DaliLoader
from ssd_lightning.data.pipelines import Augmentation, eval_pipeline, train_pipeline
from ssd_lightning.data.reader_files import built_pipeline
from ssd_lightning.data.sharding import augmentation_seed, epoch_permutation, resolve_runtime, shard_range
from ssd_lightning.data.synthetic import ensure_synthetic_coco_on_rank
from ssd_lightning.errors import DataError, DataWarning

__all__ = ["COCODataModule"]

log = logging.getLogger(__name__)


def _plain(v):
    """Hydra containers (ListConfig/DictConfig) to plain Python."""
    if isinstance(v, DictConfig | ListConfig):
        return OmegaConf.to_container(v, resolve=True)
    return v


def _pair(v, name: str) -> tuple[float, float]:
    v = _plain(v)
    if not (isinstance(v, Sequence) and len(v) == 2 and float(v[0]) <= float(v[1])):
        raise ValueError(f"data.{name} must be a [low, high] pair with low <= high, got {v!r}")
    return float(v[0]), float(v[1])


_NVIDIA = Augmentation()  # the default augmentation settings


class COCODataModule(pl.LightningDataModule):
    """COCO-format detection data through NVIDIA DALI (see the module docstring for the batch formats).

    Args:
        root: dataset folder: ``images/{train2017,val2017}`` + ``annotations/instances_{train,val}2017.json``
            (``images/`` layout) or ``{train2017,val2017,annotations}`` (COCO layout).
        train_images, train_annotations, val_images, val_annotations: per-split overrides (relative paths are
            relative to ``root``).
        batch_size: per-process training batch (as NVIDIA's ``--bs``); ``val_batch_size`` defaults to it.
        num_threads: DALI CPU threads per pipeline.
        device: ``auto`` (decode and augment on the GPU when the trainer runs on CUDA, or, without a trainer,
            when CUDA is available), ``gpu`` or ``cpu``.
        seed: epoch e's global shuffle is drawn from ``(seed, e)`` (the same on every rank), rank r's
            augmentation seed from ``(seed, e, r)`` (None: 0); see :func:`epoch_permutation`.
        shard_id, num_shards, device_id: explicit sharding / CUDA device (default: from the trainer, else
        0/1).
        precision: output precision (``"16-mixed"``, ``"bf16-mixed"``, ``"32"``...); default: the trainer's.
        val_include_empty: evaluate on every image of the val file (official COCO protocol, default) or only
        on
            images with annotations (NVIDIA's 4952 of 5000).
        train_include_crowd: use ``iscrowd`` boxes as training targets (NVIDIA does; COCO evaluation always
            treats them as ignore regions).
        check_images: check every image's header/trailer/size up front (existence is always checked).
        cache_dir: where the annotation index, the image-check stamps and a repaired annotation copy are kept
            between launches (default: ``$XDG_CACHE_HOME/ssd_lightning/data``, i.e.
            ``~/.cache/ssd_lightning/data``; see :mod:`ssd_lightning.data.index`).
        synthetic: if set (kwargs of :func:`ensure_synthetic_coco`, e.g. ``{num_train: 1000, num_val: 200}``),
            the synthetic set is written into ``root`` on first use.
        crop_*, flip_probability, brightness, contrast, saturation, hue (degrees), mean, std, match_iou:
            the fields of :class:`~ssd_lightning.data.pipelines.Augmentation` (NVIDIA SSD300 v1.1 defaults).
        prefetch_queue_depth: DALI prefetch depth.
        train_image_ids: also yield ``image_ids`` [N] int64 in training batches (debugging, tests).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_threads: int = 4,
        device: str = "auto",
        seed: int | None = 0,
        shard_id: int | None = None,
        num_shards: int | None = None,
        device_id: int | None = None,
        precision: str | int | None = None,
        val_include_empty: bool = True,
        train_include_crowd: bool = True,
        check_images: bool = True,
        cache_dir: str | os.PathLike | None = None,
        synthetic: Mapping[str, Any] | None = None,
        crop_thresholds: Sequence[float] = _NVIDIA.crop_thresholds,
        crop_scaling: Sequence[float] = _NVIDIA.crop_scaling,
        crop_aspect_ratio: Sequence[float] = _NVIDIA.crop_aspect_ratio,
        crop_attempts: int = _NVIDIA.crop_attempts,
        flip_probability: float = _NVIDIA.flip_probability,
        brightness: Sequence[float] = _NVIDIA.brightness,
        contrast: Sequence[float] = _NVIDIA.contrast,
        saturation: Sequence[float] = _NVIDIA.saturation,
        hue: Sequence[float] = _NVIDIA.hue,
        mean: Sequence[float] = _NVIDIA.mean,
        std: Sequence[float] = _NVIDIA.std,
        match_iou: float = _NVIDIA.match_iou,
        prefetch_queue_depth: int = 2,
        train_image_ids: bool = False,
    ) -> None:
        super().__init__()
        self.root = str(root) if root not in (None, "") else None
        self._overrides = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
        }
        if int(batch_size) < 1 or (val_batch_size is not None and int(val_batch_size) < 1):
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size} / {val_batch_size}")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_threads = max(1, int(num_threads))
        if str(device).lower() not in ("auto", "gpu", "cpu", "cuda"):
            raise ValueError(f"data.device must be auto, gpu or cpu, got {device!r}")
        self.device = str(device).lower()
        self.seed = int(seed) if seed is not None else 0
        self.shard_id, self.num_shards, self.device_id = shard_id, num_shards, device_id
        self.precision = precision
        self.val_include_empty = bool(val_include_empty)
        self.train_include_crowd = bool(train_include_crowd)
        self.check_images = bool(check_images)
        self.cache_dir = cache_dir
        self.synthetic = dict(_plain(synthetic)) if synthetic else None
        self.augmentation = Augmentation(
            crop_thresholds=tuple(float(t) for t in _plain(crop_thresholds)),
            crop_scaling=_pair(crop_scaling, "crop_scaling"),
            crop_aspect_ratio=_pair(crop_aspect_ratio, "crop_aspect_ratio"),
            crop_attempts=int(crop_attempts),
            flip_probability=float(flip_probability),
            brightness=_pair(brightness, "brightness"),
            contrast=_pair(contrast, "contrast"),
            saturation=_pair(saturation, "saturation"),
            hue=_pair(hue, "hue"),
            mean=tuple(float(m) for m in _plain(mean)),
            std=tuple(float(s) for s in _plain(std)),
            match_iou=float(match_iou),
        )
        self.prefetch_queue_depth = int(prefetch_queue_depth)
        self.train_image_ids = bool(train_image_ids)

        self._paths: dict[str, tuple[Path, Path]] = {}
        self._ann: dict[str, AnnotationIndex] = {}
        self._reader_files: dict[str, Path] = {}
        self._checked: set[str] = set()
        self._cache: Path | None = None
        self._runtime: dict[str, Any] | None = None
        self._loaders: list[_DaliLoader] = []

    def __getstate__(self) -> dict:
        # Picklable for ddp_spawn: pipelines, temp folders and checks are redone in the receiving process.
        state = self.__dict__.copy()
        for key, empty in (("_cache", None), ("_runtime", None), ("_loaders", []), ("_checked", set())):
            state[key] = empty
        state["_reader_files"] = {}
        return state

    # ------------------------------------------------------------------------------------- data access

    def prepare_data(self) -> None:
        """Write the synthetic set (when configured). Lightning calls this on one process per node.

        The annotation index and the image check are not done here but in :meth:`setup`, under a file lock in
        the cache folder: the first process of the node does them, the others wait and load the result (so a
        bad file ends every rank with the same one-line error instead of leaving them at a barrier).
        """
        self._ensure_synthetic()

    def _ensure_synthetic(self) -> None:
        if not self.synthetic:
            return
        if self.root is None:
            raise DataError("data.synthetic is set but data.root is not; set data.root=DIR to write it into")
        ensure_synthetic_coco_on_rank(self.root, self._global_rank(), **self.synthetic)

    def _split_paths(self, split: str) -> tuple[Path, Path]:
        if split not in self._paths:
            self._ensure_synthetic()
            images, annotations = self._overrides[split]
            self._paths[split] = resolve_split_paths(self.root, split, images, annotations)
        return self._paths[split]

    def _annotations(self, split: str) -> AnnotationIndex:
        """A split's annotation index (parsed and validated once per file and node, then cached; no image
        checks)."""
        if split not in self._ann:
            _images, ann_file = self._split_paths(split)
            ann = load_index(ann_file, self._cache_dir(), split)
            if not len(ann.image_ids):
                raise DataError(
                    f"{ann_file} lists no images; the {split} split is empty, point it at a non-empty set"
                )
            if not ann.num_annotations:
                raise DataError(
                    f"none of the {len(ann.image_ids)} images in {ann_file} has a usable annotation"
                    + (f" ({ann.report['summary']})" if ann.report["changed"] else "")
                    + f"; the {split} split needs annotated images"
                )
            if split == "train" and not self.train_include_crowd and ann.ann_crowd.all():
                raise DataError(
                    f"{ann_file} has only crowd annotations and data.train_include_crowd is false; "
                    "set data.train_include_crowd=true"
                )
            self._ann[split] = ann
        return self._ann[split]

    def _prepare_split(self, split: str) -> AnnotationIndex:
        """Annotations + image checks (both cached) + the file DALI reads, with the repair warning."""
        ann = self._annotations(split)
        if split not in self._checked:
            images_dir, _ = self._split_paths(split)
            ensure_images_checked(
                ann, images_dir, self._reader_positions(split), self.check_images, self._cache_dir(), split
            )
            self._reader_files[split] = ann.reader_file
            if self._global_rank() == 0:
                warn_sanitised(ann.path, ann.report, ann.reader_file)
            self._checked.add(split)
        return ann

    def _reader_positions(self, split: str) -> np.ndarray:
        """Positions in the split's index of the images its reader yields, by ascending image id."""
        ann = self._annotations(split)
        if split == "train":
            return ann.usable_positions(include_empty=False, include_crowd=self.train_include_crowd)
        return ann.usable_positions(include_empty=self.val_include_empty)

    def _reader_ids(self, split: str) -> list[int]:
        return self._annotations(split).image_ids[self._reader_positions(split)].tolist()

    def _cache_dir(self) -> Path:
        if self._cache is None:
            self._cache = writable_cache_dir(self.cache_dir)
        return self._cache

    # ------------------------------------------------------------------------------------- properties

    @property
    def categories(self) -> CategoryMap:
        """Category map of the dataset (from the train annotation file, else the val one)."""
        for split in ("train", "val"):
            if split in self._ann:
                return self._ann[split].categories
        try:
            self._split_paths("train")
        except DataError:
            try:
                return self._annotations("val").categories
            except DataError:
                pass
            raise
        return self._annotations("train").categories

    def categories_of(self, split: str) -> CategoryMap:
        """Category map of one split's annotation file ("train" or "val"; parsed once, cached)."""
        return self._annotations(split).categories

    @property
    def num_classes(self) -> int:
        """K + 1 (background included), for the model's ``num_classes``."""
        return self.categories.num_classes

    @property
    def val_annotations(self) -> Path:
        """The val annotation file to evaluate against (the user's original file)."""
        return self._split_paths("val")[1]

    @property
    def val_image_dir(self) -> Path:
        """The folder of the validation images (``file_name`` in the val annotations is relative to it)."""
        return self._split_paths("val")[0]

    @property
    def val_image_ids(self) -> list[int]:
        """Sorted ids of the images the val/test pipeline yields (each exactly once per epoch over all
        ranks)."""
        return self._reader_ids("val")

    @property
    def num_train_images(self) -> int:
        """Images the training pipeline reads per epoch (all ranks)."""
        return len(self._reader_positions("train"))

    # ------------------------------------------------------------------------------------- runtime

    def _global_rank(self) -> int:
        if self.shard_id is not None:
            return int(self.shard_id)
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def _resolve_runtime(self) -> dict[str, Any]:
        return resolve_runtime(
            getattr(self, "trainer", None),
            rank=self._global_rank(),
            num_shards=self.num_shards,
            device=self.device,
            device_id=self.device_id,
            precision=self.precision,
        )

    def setup(self, stage: str | None = None) -> None:
        """Validate the splits needed by ``stage`` (annotations, image files) and resolve
        rank/device/precision."""
        self._runtime = self._resolve_runtime()
        splits = ["train", "val"] if stage in (None, "fit") else ["val"]
        with warnings.catch_warnings():
            if self._runtime["rank"] != 0:
                warnings.simplefilter("ignore", DataWarning)
            for split in splits:
                self._prepare_split(split)
        if "train" in self._ann and "val" in self._ann:
            check_shared_categories(self._ann["train"], self._ann["val"])
        if "train" in self._ann:
            n = len(self._reader_positions("train"))
            world = self._runtime["world"]
            if (n // world) // self.batch_size == 0:
                raise DataError(
                    f"the train split has {n} annotated images, fewer than data.batch_size={self.batch_size} "
                    f"per rank x {world} ranks; lower data.batch_size or add images"
                )

    def _runtime_or_setup(self, stage: str, split: str) -> dict[str, Any]:
        if self._runtime is None or split not in self._checked:
            self.setup(stage)
        return self._runtime

    def train_dataloader(self) -> TrainLoader:
        rt = self._runtime_or_setup("fit", "train")
        ann = self._ann["train"]
        images_dir, _ = self._split_paths("train")
        positions = self._reader_positions("train")
        num_batches = (len(positions) // rt["world"]) // self.batch_size
        reader_file = self._reader_files["train"]
        anchors = ssd300_default_boxes().ltrb_list()

        mine = shard_range(len(positions), rt["rank"], rt["world"])

        def build(epoch: int):
            # this rank's contiguous shard of the epoch's global permutation (disjoint shards, equal on every
            # rank), read in that order; augmentation seeded by (seed, epoch, rank)
            order = positions[epoch_permutation(self.seed, epoch, len(positions))[mine.start : mine.stop]]
            return built_pipeline(
                ann,
                order,
                self.train_include_crowd,
                train_pipeline,
                images_dir=str(images_dir),
                annotation_file=str(reader_file),
                anchors_ltrb=anchors,
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device_id=rt["device_id"],
                seed=augmentation_seed(self.seed, epoch, rt["rank"]),
                shuffle_seed=self.seed % 2**31,
                shard_id=0,
                num_shards=1,
                decode_device=rt["decode"],
                dtype=rt["dtype"],
                include_crowd=self.train_include_crowd,
                prefetch_queue_depth=self.prefetch_queue_depth,
                return_image_ids=self.train_image_ids,
                augmentation=self.augmentation,
            )

        loader = TrainLoader(
            build,
            "train",
            images_dir,
            lambda _pos: [images_dir / name for name in ann.file_names_at(positions[mine.start : mine.stop])],
            rt["cast"],
            batch_size=self.batch_size,
            num_batches=num_batches,
            with_image_ids=self.train_image_ids,
            epoch_source=self._trainer_epoch,
            progress_source=self._trainer_epoch_batches,
        )
        self._loaders.append(loader)
        return loader

    def _trainer_epoch(self) -> int | None:
        """The trainer's current epoch (None without a trainer, e.g. a loader iterated by hand)."""
        epoch = getattr(getattr(self, "trainer", None), "current_epoch", None)
        return int(epoch) if isinstance(epoch, int) else None

    def _trainer_epoch_batches(self) -> int | None:
        """Training batches the trainer has run in the current epoch (None without a trainer). ``processed``:
        also right for a checkpoint written inside ``on_train_batch_end``, before the batch counts as
        completed (Lightning resumes after that batch either way)."""
        try:
            return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        except (AttributeError, TypeError, ValueError):
            return None

    def _eval_loader(self, stage: str) -> EvalLoader:
        rt = self._runtime_or_setup(stage, "val")
        ann = self._ann["val"]
        images_dir, _ = self._split_paths("val")
        positions = self._reader_positions("val")
        reader_file = self._reader_files["val"]
        mine = shard_range(len(positions), rt["rank"], rt["world"])
        window = (self.prefetch_queue_depth + 2) * self.val_batch_size

        def build():
            return built_pipeline(
                ann,
                positions,
                True,
                eval_pipeline,
                images_dir=str(images_dir),
                annotation_file=str(reader_file),
                batch_size=self.val_batch_size,
                num_threads=self.num_threads,
                device_id=rt["device_id"],
                seed=(self.seed + rt["rank"]) % 2**31,
                shard_id=rt["rank"],
                num_shards=rt["world"],
                decode_device=rt["decode"],
                dtype=rt["dtype"],
                mean=self.augmentation.mean,
                std=self.augmentation.std,
                prefetch_queue_depth=self.prefetch_queue_depth,
            )

        def candidates(position: int) -> list[Path]:
            # The failing batch is within the prefetch window after the consumed position; then the rest.
            shard_files = [images_dir / name for name in ann.file_names_at(positions[mine.start : mine.stop])]
            start = min(position, len(shard_files))
            return shard_files[start : start + window] + shard_files[:start] + shard_files[start + window :]

        loader = EvalLoader(
            build,
            "val",
            images_dir,
            candidates,
            rt["cast"],
            batch_size=self.val_batch_size,
            shard_size=len(mine),
            image_sizes=ann.sizes,
        )
        self._loaders.append(loader)
        return loader

    def val_dataloader(self) -> EvalLoader:
        return self._eval_loader("validate")

    def test_dataloader(self) -> EvalLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> EvalLoader:
        return self._eval_loader("predict")

    def teardown(self, stage: str | None = None) -> None:
        """Release the DALI pipelines (the loaders rebuild them if iterated again)."""
        for loader in self._loaders:
            loader.release()
        self._loaders.clear()
