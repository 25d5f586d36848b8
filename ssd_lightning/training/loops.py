"""``trainer.test`` and ``trainer.predict`` for :class:`~ssd_lightning.training.module.SSDModule`.

The test loop is the validation loop: the same COCO evaluation of the data module's validation split
(``COCODataModule.test_dataloader``), its ``val/<name>`` metrics logged as ``test/<name>``. The predict step
runs the network and the validation's post-processing (:func:`detect_outputs`) with the module's thresholds.
Kept out of ``module.py`` as a mixin so that the training and validation code stays in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from ssd_lightning.boxes import DefaultBoxes
from ssd_lightning.postprocess import postprocess

__all__ = ["TestAndPredictLoops", "detect_outputs"]


def detect_outputs(
    locs: torch.Tensor, confs: torch.Tensor, default_boxes: DefaultBoxes, hparams: Mapping[str, Any]
) -> list[dict[str, torch.Tensor]]:
    """``locs [N,4,8732]``, ``confs [N,C,8732]`` -> N dicts ``boxes [K,4]`` (ltrb relative to the 300x300
    input), ``scores [K]``, ``labels [K]`` (1..C-1): ``postprocess`` with the module's ``score_threshold``,
    ``nms_iou_threshold``, ``max_detections`` and ``candidates_per_class``, in float32 (whatever the
    precision the network ran in)."""
    return postprocess(
        locs.float(),
        confs.float(),
        default_boxes,
        score_threshold=hparams["score_threshold"],
        iou_threshold=hparams["nms_iou_threshold"],
        max_detections=hparams["max_detections"],
        candidates_per_class=hparams["candidates_per_class"],
    )


class TestAndPredictLoops(pl.LightningModule):
    """``test_step`` and ``predict_step`` over SSDModule's validation methods, ``forward`` and
    ``_default_boxes``."""

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``; under ``trainer.test`` the validation code's ``val/<name>`` metrics are
        logged as ``test/<name>``."""
        if self._trainer is not None and self.trainer.testing and name.startswith("val/"):
            name = "test/" + name.removeprefix("val/")
        super().log(name, value, *args, **kwargs)

    def on_test_start(self) -> None:
        self.on_validation_start()

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """As ``validation_step``: ``images [N,3,300,300]``, ``image_ids [N]``, ``image_sizes [N,2]``."""
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        """The COCO evaluation of ``on_validation_epoch_end`` (``val_metrics`` holds the numbers)."""
        self.on_validation_epoch_end()

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, torch.Tensor]]:
        """``batch["images"]`` float ``[N,3,300,300]`` (N may be 0; the other keys are the prediction
        writer's) -> N dicts ``boxes [K,4]`` (ltrb relative to the 300x300 input), ``scores [K]``,
        ``labels [K]`` (1..C-1), by :func:`detect_outputs`."""
        images = batch["images"]
        if images.shape[0] == 0:
            return []
        locs, confs = self(images)
        return detect_outputs(locs, confs, self._default_boxes(locs.device), self.hparams)
