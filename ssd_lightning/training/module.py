"""SSDModule: the LightningModule gluing SSD300, MultiBoxLoss, NVIDIA's optimiser recipe and COCO evaluation.

Training: NVIDIA's recipe (:mod:`ssd_lightning.training.schedule`).

The schedule is :class:`WarmupMultiStepLR`, stepped every optimizer step by Lightning; its state (step count,
epoch) is in the checkpoint, so a resumed run continues the schedule where it stopped.

Validation (NVIDIA's ``PyTorch/Detection/SSD/ssd/evaluate.py``): per batch, the post-processing (score >
0.05, 200 candidates per class, NMS 0.5, 200 detections) runs on the device and its detections come to the
host in one copy; at the epoch end every rank sends its detections to rank 0 (compact tensors, one message
per rank), which turns them into COCO result rows (original image ids and pixels, dataset category ids),
drops duplicates and scores them with the official COCO protocol against the data module's annotation file,
restricted to the images the validation pipeline covers. Every rank logs the same ``val/AP`` (and the 11
other COCO numbers, and ``val/AP/<class>``). Lightning's sanity check never produces metrics: its partial
pass is discarded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ssd_lightning.boxes import DefaultBoxes
from ssd_lightning.checkpoints import CheckpointError, check_label_space, check_num_classes, load_weights_into
from ssd_lightning.class_metrics import metric_safe
from ssd_lightning.evaluation import (
    METRIC_NAMES,
    CocoEvaluation,
    evaluate_coco,
    load_annotations,
    merge_detections,
)
from ssd_lightning.loss import MultiBoxLoss
from ssd_lightning.model import SSD300
from ssd_lightning.postprocess import postprocess
from ssd_lightning.training.clipping import FusedKernelClipping
from ssd_lightning.training.epoch_means import EpochMeans
from ssd_lightning.training.loops import TestAndPredictLoops
from ssd_lightning.training.schedule import (
    WarmupMultiStepLR,
    milestone_values,
    param_groups,
    resolve_schedule,
    scaled_lr,
    trainer_run_length,
    warmup_value,
)
from ssd_lightning.training.validation import (
    HostDetections,
    coco_rows,
    concat_batches,
    detections_to_host,
    gather_to_rank_zero,
)

__all__ = ["SSDModule"]

log = logging.getLogger(__name__)

#: metric names of ``LossParts`` (total, box, cls), in its order
_LOSS_PARTS = ("loss", "loss_box", "loss_cls")


# ----------------------------------------------------------------------------------------------------
# Optimiser recipe: pure functions and the scheduler
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------------


def _plain_list(value: Iterable[Any] | None, kind: type) -> list[Any] | None:
    return None if value is None else [kind(v) for v in value]


class SSDModule(TestAndPredictLoops, FusedKernelClipping, pl.LightningModule):
    """SSD300 + MultiBoxLoss with NVIDIA's training recipe and COCO evaluation.

    All arguments are plain numbers, strings and lists (the checkpoint's ``hyper_parameters``, read back with
    ``torch.load(weights_only=True)``). The network is ``self.model`` (its keys ``model.<SSD300 key>``).

    Args:
        backbone: ResNet trunk, ``resnet18`` ... ``resnet152`` (``resnet50``: NVIDIA SSD300 v1.1).
        num_classes: classes including the background (label 0).
        backbone_weights: None, ``imagenet_v1``, ``imagenet_v2`` or a torchvision ResNet state_dict path.
        category_ids: dataset category id of labels 1..num_classes-1 (the data module's category map); used to
            write COCO results. None: take the data module's.
        class_names: names of labels 1..num_classes-1 (kept in the checkpoint for inference tools).
        lr: learning rate per ``reference_batch_size`` images (NVIDIA: 2.6e-3 per 32).
        reference_batch_size: the batch size ``lr`` refers to.
        batch_size: per-device batch size for the learning-rate scaling when the data module does not say.
        momentum, weight_decay, nesterov: SGD settings (weight decay on conv weights only).
        warmup_steps: linear warmup length in optimizer steps (0: none), or a fraction of the run (0 < f < 1).
        milestones: epochs (0-based) from which the rate is multiplied by ``gamma`` once more, or fractions
            of the run (all ``0 < f < 1``; see :func:`~ssd_lightning.training.schedule.resolve_schedule`).
        gamma: decay factor at each milestone.
        neg_pos_ratio: hard negatives per positive in the loss.
        score_threshold, nms_iou_threshold, max_detections, candidates_per_class: validation post-processing
            (NVIDIA: 0.05, 0.5, 200, 200).
        channels_last: run the network in channels_last memory format (faster with AMP on tensor cores).
        eval_backend: ``faster_coco_eval`` or ``pycocotools`` (same numbers to 1e-4).
        init_from: a checkpoint (train.py ``.ckpt``, NVIDIA DeepLearningExamples ``.pt`` or a bare SSD300
            state dict) whose weights start the training (fine-tuning): the trunk, the extra blocks and the
            box heads are copied; the classification heads too when the class count is the same, else they
            keep their fresh initialisation. The trunk must be ``backbone``'s; ``backbone_weights`` is not
            loaded.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 81,
        backbone_weights: str | None = None,
        category_ids: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        lr: float = 2.6e-3,
        reference_batch_size: int = 32,
        batch_size: int = 32,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        warmup_steps: float = 0,
        milestones: Sequence[float] = (43, 54),
        gamma: float = 0.1,
        neg_pos_ratio: float = 3.0,
        score_threshold: float = 0.05,
        nms_iou_threshold: float = 0.5,
        max_detections: int = 200,
        candidates_per_class: int = 200,
        channels_last: bool = False,
        eval_backend: str = "faster_coco_eval",
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        category_ids = _plain_list(category_ids, int)
        class_names = _plain_list(class_names, str)
        if category_ids is not None:
            check_num_classes(num_classes, len(category_ids))
        if reference_batch_size <= 0 or batch_size <= 0:
            raise ValueError("optim.reference_batch_size and data.batch_size must be positive")
        for key, value in (("lr", lr), ("gamma", gamma)):
            if not float(value) > 0:
                raise ValueError(f"optim.{key}={value}: must be > 0")
        for key, value in (
            ("warmup_steps", warmup_steps),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
        ):
            if float(value) < 0:
                raise ValueError(f"optim.{key}={value}: must be >= 0")
        hparams = {
            "backbone": str(backbone),
            "num_classes": int(num_classes),
            "backbone_weights": None if backbone_weights is None else str(backbone_weights),
            "category_ids": category_ids,
            "class_names": class_names,
            "lr": float(lr),
            "reference_batch_size": int(reference_batch_size),
            "batch_size": int(batch_size),
            "momentum": float(momentum),
            "weight_decay": float(weight_decay),
            "nesterov": bool(nesterov),
            "warmup_steps": warmup_value(warmup_steps),
            "milestones": milestone_values(milestones),
            "gamma": float(gamma),
            "neg_pos_ratio": float(neg_pos_ratio),
            "score_threshold": float(score_threshold),
            "nms_iou_threshold": float(nms_iou_threshold),
            "max_detections": int(max_detections),
            "candidates_per_class": int(candidates_per_class),
            "channels_last": bool(channels_last),
            "eval_backend": str(eval_backend),
            "init_from": None if init_from is None else str(init_from),
        }
        self.save_hyperparameters(hparams)

        self.model = SSD300(
            backbone=backbone,
            num_classes=int(num_classes),
            backbone_weights=None if init_from is not None else backbone_weights,
        )
        if init_from is not None:
            self._init_from(str(init_from))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss = MultiBoxLoss(self.model.default_boxes, neg_pos_ratio=neg_pos_ratio)
        self.epoch_means = EpochMeans(_LOSS_PARTS)  # torchmetrics; not in the state dict

        #: the 12 COCO metrics of the last completed validation (None before the first one).
        self.val_metrics: dict[str, float] | None = None
        #: rank 0: the COCO result rows of the last completed validation (all ranks, duplicates dropped).
        self.val_detections: list[dict[str, Any]] | None = None
        #: rank 0: the last completed validation's ``CocoEvaluation`` (per-class table, precision curves).
        self.val_evaluation: CocoEvaluation | None = None
        #: the learning rate at the optimizer's first step (after scaling to the global batch).
        self.base_lr: float | None = None
        self._val_batches: list[HostDetections] = []  # this validation's batches, on the host
        self._gt_cache: tuple[str, Any] | None = None
        self._last_batch_end: float | None = None
        self._throughputs: list[float] = []  # this epoch's step values (images/s over all ranks)
        self._loss_on_host: tuple[torch.Tensor, Any] | None = None  # (pinned host loss, its copy's event)

    def _init_from(self, path: str) -> None:
        """Copy the weights of checkpoint ``path`` into the network (``model.init_from``)."""
        try:
            fresh = load_weights_into(self.model, path)
        except CheckpointError as err:
            raise CheckpointError(f"model.init_from={path}: {err}") from None
        log.info(
            "model.init_from=%s: weights loaded%s",
            path,
            f" except the {len(fresh)} classification-head tensors (another class count)" if fresh else "",
        )

    # ----------------------------------------------------------------------------------------------------
    # forward / training
    # ----------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # every rank says who it is and what it trains (a DDP rank's line goes to its own log file)
        hp = self.hparams
        log.info(
            "rank %d of %d (%s): %s %d classes, optim.lr=%g warmup_steps=%s weight_decay=%g milestones=%s",
            self.trainer.global_rank,
            self.trainer.world_size,
            getattr(stage, "value", stage),
            hp.backbone,
            hp.num_classes,
            hp.lr,
            hp.warmup_steps,
            hp.weight_decay,
            hp.milestones,
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [N,3,300,300]`` -> ``(locs [N,4,8732], confs [N,num_classes,8732])``."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """``batch``: ``images [N,3,300,300]``, ``boxes [N,8732,4]`` (xywh, DALI ``box_encoder``),
        ``labels [N,8732]`` (0 background)."""
        images = batch["images"]
        locs, confs = self(images)
        parts = self.loss.components(locs, confs, batch["boxes"].transpose(1, 2), batch["labels"].long())
        self._log_train_step(parts, images.shape[0])
        self._update_epoch_means(parts, images.shape[0])
        return parts.total

    def _update_epoch_means(self, parts: Any, batch_size: int) -> None:
        """``train/loss_epoch``, ``train/loss_box_epoch``, ``train/loss_cls_epoch``: the epoch means over all
        ranks, weighted by batch size, without a host read per step (:mod:`.epoch_means`). Lightning computes
        them at the epoch end (one all-reduce under DDP) and resets them. A step whose loss is not finite
        (NonFiniteGuard skips and reports it) is left out."""
        self.epoch_means.add(parts, batch_size)
        for name, mean in self.epoch_means.items():
            self.log(f"train/{name}_epoch", mean, on_step=False, on_epoch=True)

    def _log_train_step(self, parts: Any, batch_size: int) -> None:
        """Log the step's losses and learning rate without making the host wait for the device.

        The losses stay device tensors: Lightning reads them on the host only on logging steps
        (``trainer.log_every_n_steps``) and at the epoch end. The learning rate is a CPU tensor (a Python
        float would be copied to the device, a blocking copy). The progress bar shows ``loss``, a host copy
        of the step loss: on a GPU an asynchronous copy started at one step and shown once it has landed
        (usually the next step), so the bar never waits for the device.
        """
        n = batch_size
        self.log("train/loss_step", parts.total, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss_box_step", parts.box, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss_cls_step", parts.cls, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/lr", torch.tensor(self._current_lr()), on_step=True, on_epoch=False, batch_size=n)
        loss = parts.total.detach()
        bar = {"prog_bar": True, "logger": False, "on_step": True, "on_epoch": False, "batch_size": n}
        if loss.device.type == "cpu":
            self.log("loss", loss, **bar)
            return
        landed = self._loss_on_host
        done = landed is not None and landed[1].query()  # the copy has finished: reading it does not wait
        if done:
            self.log("loss", landed[0], **bar)
        if landed is None or done:
            event = torch.Event(loss.device)
            host = loss.float().to("cpu", non_blocking=True)  # pinned, asynchronous
            event.record()
            self._loss_on_host = (host, event)

    def on_train_start(self) -> None:
        # optim.warmup_steps / optim.milestones as fractions need the run's length: known once the training
        # data is set up (and a resumed run's position restored)
        scheduler = self._scheduler()
        if scheduler is None:
            return
        hp = self.hparams
        length = trainer_run_length(self.trainer)
        schedule = resolve_schedule(hp.warmup_steps, hp.milestones, length)
        scheduler.apply(schedule, self.current_epoch)
        if self.trainer.is_global_zero:
            log.info(
                "SGD lr %.6g = optim.lr %.6g x global batch %d / %d; %s",
                self.base_lr,
                hp.lr,
                self.global_batch_size(),
                hp.reference_batch_size,
                schedule.describe(hp.gamma),
            )
            if length is not None:
                log.info("training budget: %s (trainer.max_%s)", length.describe(), length.bounded_by)

    def on_train_epoch_start(self) -> None:
        scheduler = self._scheduler()
        if scheduler is not None:
            scheduler.set_epoch(self.current_epoch)
        self._last_batch_end = None
        self._throughputs = []

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Images per second over all ranks, from the wall time between consecutive batches (data loading
        # included; no device synchronisation). The first batch of an epoch has no predecessor.
        now = time.perf_counter()
        if self._last_batch_end is not None:
            images = int(batch["images"].shape[0]) * self.trainer.world_size
            throughput = images / max(now - self._last_batch_end, 1e-9)
            self._throughputs.append(throughput)
            # a CPU tensor (no device copy), step only: an epoch value would be unsynchronised under DDP
            self.log("train/throughput_step", torch.tensor(throughput), on_epoch=False, batch_size=1)
        self._last_batch_end = now

    def on_train_epoch_end(self) -> None:
        # the mean of the epoch's step values, averaged over the ranks once (every rank has as many batches)
        if self._throughputs:
            mean = sum(self._throughputs) / len(self._throughputs)
            self.log("train/throughput_epoch", mean, on_epoch=True, sync_dist=True, batch_size=1)

    def _current_lr(self) -> float:
        optimizer = self.optimizers(use_pl_optimizer=False)
        if isinstance(optimizer, list):
            optimizer = optimizer[0] if optimizer else None
        return float(optimizer.param_groups[0]["lr"]) if optimizer is not None else 0.0

    def _scheduler(self) -> WarmupMultiStepLR | None:
        if self._trainer is None:
            return None
        schedulers = self.lr_schedulers()
        if isinstance(schedulers, list):
            schedulers = schedulers[0] if schedulers else None
        return schedulers if isinstance(schedulers, WarmupMultiStepLR) else None

    def global_batch_size(self) -> int:
        """``batch_size x world_size x accumulate_grad_batches`` (the data module's batch size if set)."""
        batch_size = self.hparams.batch_size
        world_size, accumulate = 1, 1
        if self._trainer is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            batch_size = int(getattr(datamodule, "batch_size", None) or batch_size)
            world_size = self.trainer.world_size
            accumulate = self.trainer.accumulate_grad_batches
        return int(batch_size) * int(world_size) * int(accumulate)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        global_batch = self.global_batch_size()
        self.base_lr = scaled_lr(hp.lr, global_batch, hp.reference_batch_size)
        optimizer = torch.optim.SGD(
            param_groups(self.model, hp.weight_decay),
            lr=self.base_lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov,
        )
        # the schedule (warmup, milestones) is set at on_train_start, when the run's length is known
        scheduler = WarmupMultiStepLR(optimizer, 0, (), hp.gamma)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
        }

    # ----------------------------------------------------------------------------------------------------
    # validation / COCO evaluation
    # ----------------------------------------------------------------------------------------------------

    def _datamodule(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_annotations"):
            raise RuntimeError(
                "SSDModule validation needs the data module (val_annotations, val_image_ids, categories): "
                "pass datamodule= to trainer.fit/validate"
            )
        return datamodule

    def category_ids(self) -> list[int]:
        """Dataset category ids of labels 1..K (the model's own when known, else the data module's)."""
        if self.hparams.category_ids is not None:
            return list(self.hparams.category_ids)
        return [int(i) for i in self._datamodule().categories.dataset_ids]

    def on_validation_start(self) -> None:
        self._check_categories()

    def _check_categories(self) -> None:
        """The model's label space must be the data set's, else the AP would be silently wrong."""
        data_ids = self._datamodule().categories.dataset_ids
        check_label_space(self.hparams.num_classes, self.hparams.category_ids, data_ids)

    def on_validation_epoch_start(self) -> None:
        self._val_batches = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """``batch``: ``images [N,3,300,300]``, ``image_ids [N]``, ``image_sizes [N,2]`` (height, width).

        The batch's detections come to the host in one copy (:func:`detections_to_host`) and are kept in that
        compact form until the epoch end; the ids and sizes stay where they are until then (one copy each per
        validation, not a blocking read per batch)."""
        hp = self.hparams
        locs, confs = self(batch["images"])
        detections = postprocess(
            locs,
            confs,
            self._default_boxes(locs.device),
            score_threshold=hp.score_threshold,
            iou_threshold=hp.nms_iou_threshold,
            max_detections=hp.max_detections,
            candidates_per_class=hp.candidates_per_class,
        )
        packed, counts = detections_to_host(detections)
        ids, sizes = batch["image_ids"].detach().reshape(-1), batch["image_sizes"].detach().reshape(-1, 2)
        self._val_batches.append((ids, sizes, counts, packed))  # ids, sizes: to the host at the epoch end

    def _default_boxes(self, device: torch.device) -> DefaultBoxes:
        boxes = self.model.default_boxes
        if boxes.xywh.device != device:
            boxes = dataclasses.replace(boxes, xywh=boxes.xywh.to(device), ltrb=boxes.ltrb.to(device))
            self.model.default_boxes = boxes
        return boxes

    def on_validation_epoch_end(self) -> None:
        batches, self._val_batches = self._val_batches, []
        if self.trainer.sanity_checking:  # a partial pass: never scored, never logged
            return
        gathered = gather_to_rank_zero(concat_batches(batches))

        metrics: dict[str, float] | None = None
        per_class: dict[str, dict[str, Any]] | None = None
        if self.trainer.is_global_zero:
            datamodule = self._datamodule()
            ids = self.category_ids()
            detections = merge_detections([coco_rows(part, ids) for part in gathered])
            expected = [int(i) for i in datamodule.val_image_ids]
            covered = {int(i) for part in gathered for i in part[0].tolist()}
            if covered != set(expected):
                log.warning(
                    "validation covered %d of the %d validation images (limit_val_batches, fast_dev_run or a "
                    "pipeline problem); the missing images count as undetected",
                    len(covered & set(expected)),
                    len(expected),
                )
            self.val_evaluation = evaluate_coco(
                self._ground_truth(datamodule.val_annotations),
                detections,
                image_ids=expected,
                backend=self.hparams.eval_backend,
            )
            metrics, per_class = self.val_evaluation.metrics, self.val_evaluation.per_class
            self.val_detections = detections
            log.info(
                "%s: %s (%d images, %d detections)",
                f"epoch {self.current_epoch}"
                if self.trainer.training or self.trainer.state.fn == "fit"
                else "eval",
                " ".join(f"{k} {metrics[k]:.4f}" for k in ("AP", "AP50", "AP75")),
                len(expected),
                len(detections),
            )
        metrics, per_class = self.trainer.strategy.broadcast((metrics, per_class), src=0)
        self.val_metrics = dict(metrics)
        for name in METRIC_NAMES:
            self.log(f"val/{name}", float(metrics[name]), prog_bar=name == "AP", sync_dist=True)
        self._log_class_ap(per_class)

    def _log_class_ap(self, per_class: dict[str, dict[str, Any]]) -> None:
        """``val/AP/<class>`` for every class: the same values on every rank (broadcast), logged as CPU
        tensors without a sync (no device copy, no collective per class)."""
        for name, values in per_class.items():
            self.log(f"val/AP/{metric_safe(name)}", torch.tensor(float(values["AP"])), sync_dist=False)

    def _ground_truth(self, annotations: Any) -> Any:
        """The COCO ground truth, loaded once per annotation file."""
        key = str(Path(annotations)) if isinstance(annotations, (str, Path)) else str(id(annotations))
        if self._gt_cache is None or self._gt_cache[0] != key:
            self._gt_cache = (key, load_annotations(annotations, self.hparams.eval_backend))
        return self._gt_cache[1]
