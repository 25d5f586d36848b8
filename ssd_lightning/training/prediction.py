"""``trainer.predict`` for pictures: the ONNX file as a LightningModule and the writer of the results.

* :class:`OnnxDetector`: an ``export.py`` ONNX file run with onnxruntime, with ``SSDModule``'s post-processing
  (:func:`~ssd_lightning.training.loops.detect_outputs`).
* :class:`PredictionWriter`: Lightning's ``BasePredictionWriter``; after every batch it turns the detections
  into COCO result rows (original pixels, dataset category ids) and draws the pictures (in threads, on the
  rank that predicted them); :meth:`PredictionWriter.gather` then brings every rank's rows to every rank,
  in file order, and checks that each file was predicted once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter

from ssd_lightning.boxes import DefaultBoxes, ssd300_default_boxes
from ssd_lightning.categories import CategoryMap
from ssd_lightning.evaluation import detections_to_coco
from ssd_lightning.fileio import atomic_write
from ssd_lightning.images import draw_detections
from ssd_lightning.model.onnx_file import OnnxSSD300
from ssd_lightning.training.loops import detect_outputs

__all__ = ["OnnxDetector", "PredictionWriter", "Predictions", "save_drawing"]

log = logging.getLogger("ssd_lightning")


class OnnxDetector(pl.LightningModule):
    """An ONNX file of ``export.py`` (:class:`~ssd_lightning.model.onnx_file.OnnxSSD300`) for
    ``trainer.predict``: onnxruntime (float32, whatever ``trainer.precision`` says) on the CPU, or CUDA
    when the trainer runs on a GPU and onnxruntime has it; the post-processing is ``SSDModule``'s."""

    def __init__(
        self,
        path: str,
        score_threshold: float = 0.05,
        nms_iou_threshold: float = 0.5,
        max_detections: int = 200,
        candidates_per_class: int = 200,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.onnx = OnnxSSD300(path)
        self._boxes: DefaultBoxes | None = None

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        if device.type != "cpu":  # the session for this process's device
            self.onnx = OnnxSSD300(self.hparams.path, device=str(device))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.onnx(images)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """As :meth:`SSDModule.predict_step`."""
        images = batch["images"]
        if images.shape[0] == 0:
            return []
        locs, confs = self(images)
        if self._boxes is None or self._boxes.xywh.device != locs.device:
            boxes = ssd300_default_boxes()
            device = locs.device
            self._boxes = dataclasses.replace(boxes, xywh=boxes.xywh.to(device), ltrb=boxes.ltrb.to(device))
        return detect_outputs(locs, confs, self._boxes, self.hparams)


@dataclass
class Predictions:
    """What all ranks predicted, in file order.

    Attributes:
        images: per readable file, ``{"id", "file_name", "height", "width", "detections"[, "drawing"]}``.
        detections: COCO result rows (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels, ``score``).
        skipped: per unreadable file, ``{"file_name", "reason"}``.
        per_rank: files (readable or not) each rank handled.
        seconds: wall time of the predict loops, from the first rank's start to the last rank's end (the
            model loading and process start-up not included; the drawings included).
    """

    images: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    per_rank: list[int] = field(default_factory=list)
    seconds: float = 0.0


def save_drawing(path: Path, image: np.ndarray, rows: list[dict[str, Any]], categories: CategoryMap) -> None:
    """``image`` (uint8 ``[H, W, 3]``) with the result ``rows`` drawn, as a PNG written atomically."""
    label_of = {cid: i + 1 for i, cid in enumerate(categories.dataset_ids)}
    ltrb = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)]
    boxes = torch.tensor(ltrb, dtype=torch.float64)
    drawn = draw_detections(
        torch.from_numpy(image).permute(2, 0, 1),
        boxes.reshape(-1, 4),
        [label_of[r["category_id"]] for r in rows],
        [r["score"] for r in rows],
        categories,
    )
    with atomic_write(path, "wb") as f:
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(f, format="PNG")


class PredictionWriter(BasePredictionWriter):
    """Collects the COCO rows of the batches this rank predicts and draws its pictures.

    Args:
        categories: the model's labels 1..C-1 (dataset ids, names).
        image_ids: the COCO image id of each input file (by file index).
        drawings_dir: where ``<drawing_names[i]>`` PNGs go; None: no drawings.
        drawing_names: the PNG name of each input file (by file index).
        clip_boxes: clip the boxes to the image.
        threads: drawing threads.
    """

    def __init__(
        self,
        categories: CategoryMap,
        image_ids: Sequence[int],
        drawings_dir: Path | None = None,
        drawing_names: Sequence[str] = (),
        clip_boxes: bool = True,
        threads: int = 2,
    ) -> None:
        super().__init__(write_interval="batch")
        self.categories = categories
        self.image_ids = list(image_ids)
        self.drawings_dir = drawings_dir
        self.drawing_names = list(drawing_names)
        self.clip_boxes = clip_boxes
        self.threads = max(1, int(threads))
        self._found: list[tuple[int, dict[str, Any], list[dict[str, Any]]]] = []
        self._skipped: list[tuple[int, dict[str, str]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._saving: list[Future] = []
        self._started: float | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.time()  # wall clock: comparable between the ranks of a machine

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Sequence[Mapping[str, torch.Tensor]],
        batch_indices: Sequence[int] | None,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for index, path, reason in batch["failed"]:
            log.warning("skipped %s: %s", path, reason)
            self._skipped.append((index, {"file_name": path, "reason": reason}))
        for index, path, size, original, found in zip(
            batch["index"], batch["paths"], batch["sizes"], batch["originals"], prediction, strict=True
        ):
            rows = detections_to_coco(
                [self.image_ids[index]], [size], [found], self.categories.dataset_ids, clip=self.clip_boxes
            )
            entry = {
                "id": self.image_ids[index],
                "file_name": path,
                "height": size[0],
                "width": size[1],
                "detections": len(rows),
            }
            if self.drawings_dir is not None:
                entry["drawing"] = f"{self.drawings_dir.name}/{self.drawing_names[index]}"
                self._draw(self.drawings_dir / self.drawing_names[index], original, rows)
            self._found.append((index, entry, rows))

    def _draw(self, path: Path, image: np.ndarray, rows: list[dict[str, Any]]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="drawing")
        self._saving.append(self._pool.submit(save_drawing, path, image, rows, self.categories))
        while len(self._saving) > 2 * self.threads:  # bounded memory: wait for the oldest drawings
            self._saving.pop(0).result()

    def _finish_drawings(self) -> None:
        for future in self._saving:
            future.result()
        self._saving = []
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def gather(self) -> Predictions:
        """Wait for this rank's drawings, then every rank's results in file order (call on every rank
        after ``trainer.predict``; a rank whose shard was empty never ran the predict loop's hooks).

        Raises:
            RuntimeError: a file predicted by two ranks (a sharding bug: never expected).
        """
        self._finish_drawings()
        span = (self._started, time.time()) if self._started is not None else None
        mine = (self._found, self._skipped, span)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        else:
            parts = [mine]
        spans = [span for _, _, span in parts if span is not None]
        result = Predictions(
            per_rank=[len(found) + len(skipped) for found, skipped, _ in parts],
            seconds=max(end for _, end in spans) - min(start for start, _ in spans) if spans else 0.0,
        )
        seen: set[int] = set()
        items = sorted(
            [(i, "found", (entry, rows)) for found, _, _ in parts for i, entry, rows in found]
            + [(i, "skipped", skip) for _, skipped, _ in parts for i, skip in skipped],
            key=lambda item: item[0],
        )
        for index, kind, value in items:
            if index in seen:
                raise RuntimeError(f"input file {index} was predicted twice (ranks {result.per_rank})")
            seen.add(index)
            if kind == "skipped":
                result.skipped.append(value)
            else:
                entry, rows = value
                result.images.append(entry)
                result.detections.extend(rows)
        return result
