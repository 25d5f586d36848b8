"""Pictures while training: a few fixed validation images with ground truth and predictions, after each
validation.

:class:`ValidationPictures` (``callbacks.pictures`` in ``conf/callbacks/pictures.yaml``) picks
``num_images`` annotated validation images once (evenly spaced over the sorted image ids, so every run of
a data set shows the same ones), reads them with PIL (:func:`~ssd_lightning.images.read_image`, not
through DALI, so the DALI pipelines and their epoch order are untouched) and, after every validation on
rank 0, runs the model's own :meth:`~ssd_lightning.model.SSD300.detect` on them. The picture is a grid
with one row per image: the ground truth on the left, the predictions (class name and score, at least
``score_threshold``) on the right, both drawn on the 300x300 input the network sees. It goes to
TensorBoard (``add_image`` under ``tag``) when a TensorBoard logger is configured, else to
``<dirpath>/epoch_<n>.png``; with an MLflow logger the PNG is also logged as a run artifact
(``pictures/``).

It draws no random numbers and changes no state of the model (the training mode is restored), so the
metrics and the training RNG are those of a run without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger
from torchvision.utils import make_grid

from ssd_lightning.categories import CategoryMap
from ssd_lightning.evaluation import load_annotations
from ssd_lightning.fileio import atomic_write
from ssd_lightning.images import INPUT_SIZE, draw_detections, preprocess, read_image, squash_resize

__all__ = ["ValidationPictures", "pick_evenly"]

log = logging.getLogger(__name__)


@dataclass
class _Sample:
    """One fixed validation image: ``image`` uint8 ``[3, 300, 300]`` (squashed), ground-truth ``boxes``
    ``[K, 4]`` ltrb in its 300x300 pixels and ``labels`` ``[K]`` (1..C-1)."""

    image_id: int
    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor


def pick_evenly(ids: list[int], count: int) -> list[int]:
    """``count`` of ``ids`` evenly spaced, first one included (all of them when there are fewer)."""
    if count >= len(ids):
        return list(ids)
    return [ids[i * len(ids) // count] for i in range(count)]


def _ground_truth(coco: Any, image_id: int, categories: CategoryMap) -> tuple[torch.Tensor, torch.Tensor]:
    """The image's annotated boxes ``[K, 4]`` (ltrb, original pixels) and labels ``[K]``."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    boxes = torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32
    )
    labels = categories.to_label([a["category_id"] for a in anns])
    return boxes.reshape(-1, 4), labels.reshape(-1)


def load_samples(datamodule: Any, count: int) -> list[_Sample]:
    """The ``count`` fixed validation images (annotated ones, evenly spaced over the sorted ids)."""
    coco = load_annotations(datamodule.val_annotations)
    categories = datamodule.categories
    annotated = [i for i in datamodule.val_image_ids if coco.getAnnIds(imgIds=[i])]
    samples = []
    for image_id in pick_evenly(annotated, count):
        original = read_image(Path(datamodule.val_image_dir) / coco.imgs[image_id]["file_name"])
        height, width = original.shape[1:]
        boxes, labels = _ground_truth(coco, image_id, categories)
        scale = torch.tensor([INPUT_SIZE / width, INPUT_SIZE / height] * 2)
        samples.append(_Sample(image_id, squash_resize(original), boxes * scale, labels))
    return samples


class ValidationPictures(pl.Callback):
    """After each validation (rank 0, not the sanity check): ground truth and predictions of a few fixed
    validation images, to TensorBoard or a PNG in the run directory (see the module docstring).

    Args:
        dirpath: folder of the PNG files (``<run dir>/pictures``).
        num_images: how many validation images (0: off).
        score_threshold: the lowest score drawn.
        max_detections: at most this many predictions drawn per image.
        tag: the TensorBoard image tag.
    """

    def __init__(
        self,
        dirpath: str | Path,
        num_images: int = 4,
        score_threshold: float = 0.3,
        max_detections: int = 20,
        tag: str = "val/pictures",
    ) -> None:
        if int(num_images) < 0:
            raise ValueError(f"callbacks.pictures.num_images={num_images}: must be >= 0")
        self.dirpath = Path(dirpath)
        self.num_images = int(num_images)
        self.score_threshold = float(score_threshold)
        self.max_detections = int(max_detections)
        self.tag = tag
        self._samples: list[_Sample] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_images == 0:
            return
        if self._samples is None:
            datamodule = trainer.datamodule
            if not hasattr(datamodule, "val_image_dir"):  # not a COCODataModule: no files to read
                log.info("validation pictures need the COCO data module: none drawn")
                self.num_images = 0
                return
            self._samples = load_samples(datamodule, self.num_images)
        if not self._samples:
            return
        picture = self.render(trainer, pl_module)
        self.publish(trainer, picture)

    @torch.no_grad()
    def detect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, torch.Tensor]]:
        """The model's detections of the fixed images (boxes ltrb relative to the 300x300 input)."""
        images = preprocess(torch.stack([s.image for s in self._samples])).to(pl_module.device)
        precision = trainer.precision_plugin
        was_training = pl_module.training
        pl_module.eval()
        try:
            with precision.forward_context():
                return pl_module.model.detect(
                    precision.convert_input(images),
                    score_threshold=self.score_threshold,
                    max_detections=self.max_detections,
                )
        finally:
            pl_module.train(was_training)

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        """The grid: uint8 ``[3, H, W]``, one row per image, ground truth left, predictions right."""
        categories = trainer.datamodule.categories
        panels = []
        for sample, det in zip(self._samples, self.detect(trainer, pl_module), strict=True):
            keep = det["labels"] <= len(categories)  # a head wider than the data set: labels without a name
            boxes = det["boxes"][keep].float().cpu().clamp(0, 1) * INPUT_SIZE
            panels.append(
                draw_detections(sample.image, sample.boxes, sample.labels.tolist(), None, categories)
            )
            panels.append(
                draw_detections(
                    sample.image,
                    boxes,
                    det["labels"][keep].tolist(),
                    det["scores"][keep].tolist(),
                    categories,
                )
            )
        return make_grid(panels, nrow=2, padding=4, pad_value=255)

    def publish(self, trainer: pl.Trainer, picture: torch.Tensor) -> Path | None:
        """Log ``picture`` to TensorBoard, else write it as a PNG (also when MLflow takes it as an artifact).
        Returns the PNG's path, if one was written."""
        loggers = trainer.loggers
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, picture, global_step=trainer.global_step)
                logger.experiment.flush()
        mlflow = [logger for logger in loggers if isinstance(logger, MLFlowLogger)]
        if any(isinstance(logger, TensorBoardLogger) for logger in loggers) and not mlflow:
            return None
        path = self.dirpath / f"epoch_{trainer.current_epoch:03d}.png"
        with atomic_write(path, "wb") as f:
            Image.fromarray(picture.permute(1, 2, 0).numpy()).save(f, format="PNG")
        for logger in mlflow:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="pictures")
        log.info("validation pictures: %s", path)
        return path
