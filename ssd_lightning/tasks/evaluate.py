"""``evaluate.py``: the COCO table of a checkpoint (train.py or NVIDIA) or of a results file.

A checkpoint is evaluated by Lightning's ``Trainer.validate`` on the data module's validation pipeline, so
``trainer.devices``, ``trainer.precision`` and DDP work as in training; rank 0 scores the detections of all
ranks with the official COCO protocol (:mod:`ssd_lightning.evaluation`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssd_lightning.checkpoints import check_evaluation_classes, check_state_dict, read_checkpoint
from ssd_lightning.errors import ConfigError, DataError
from ssd_lightning.evaluation import CocoEvaluation, evaluate_coco
from ssd_lightning.fileio import write_json_atomic
from ssd_lightning.pr_plot import write_pr_plot
from ssd_lightning.runtime.builders import (
    build_datamodule,
    build_trainer,
    instantiate_callbacks,
    instantiate_loggers,
    prepare_synthetic,
)
from ssd_lightning.runtime.config_check import check_config
from ssd_lightning.runtime.ddp_sweeps import JobScope, install_ddp_sweep_support
from ssd_lightning.runtime.entry import one_line
from ssd_lightning.runtime.results import (
    DETECTIONS_FILE,
    METRICS_FILE,
    PR_PLOT_FILE,
    metrics_document,
    print_table,
    quiet_known_warnings,
)
from ssd_lightning.training.callbacks import ModelSummaryPrinter, exit_preempted


def load_for_evaluation(cfg: DictConfig, ckpt_path: str) -> pl.LightningModule:
    """The SSDModule of ``cfg.model`` (thresholds, back end) holding the network and classes of checkpoint
    ``ckpt_path`` (train.py or NVIDIA). Raises a one-line CheckpointError when the file does not fit."""
    loaded = read_checkpoint(ckpt_path)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("backbone", "backbone_weights", "num_classes", "category_ids", "class_names", "init_from"):
        model_cfg.pop(key, None)
    module = hydra.utils.instantiate(
        model_cfg,
        _convert_="all",
        backbone=loaded.backbone,
        num_classes=loaded.num_classes,
        backbone_weights=None,
        init_from=None,  # the checkpoint's own weights are loaded below
        category_ids=loaded.category_ids,
        class_names=loaded.class_names,
    )
    check_state_dict(
        module.model, loaded.state_dict, f"{ckpt_path} does not match SSD300(backbone={loaded.backbone})"
    )
    module.model.load_state_dict(loaded.state_dict, strict=False)
    return module


def check_data_classes(ckpt_path: str, module: pl.LightningModule, datamodule: Any) -> None:
    """The checkpoint's classes against the validation set's categories
    (:func:`~ssd_lightning.checkpoints.compat.check_evaluation_classes`); NVIDIA's COCO model gets the COCO
    ids."""
    hp = module.hparams
    data_ids = datamodule.categories_of("val").dataset_ids  # parsed once, cached
    ids = check_evaluation_classes(
        ckpt_path, hp.num_classes, hp.category_ids, data_ids, datamodule.val_annotations
    )
    if ids is not None:
        hp.category_ids = ids


def score_detections_file(cfg: DictConfig, seed: int) -> CocoEvaluation:
    """``evaluate.py detections=FILE``: score a COCO results file against the validation annotations, on
    the images the validation pipeline covers (all the file's images unless ``data.val_include_empty=false``).
    """

    path = Path(cfg.detections)
    if not path.is_file():
        raise ConfigError(
            f"detections={path}: file not found (a COCO results JSON: image_id, category_id, bbox, score)"
        )
    datamodule = build_datamodule(cfg, seed)
    try:
        annotations, image_ids = datamodule.val_annotations, datamodule.val_image_ids
    except DataError:
        # no image folder needed to score a file: data.val_annotations alone is enough
        explicit = cfg.data.get("val_annotations")
        if not explicit:
            raise
        annotations = Path(explicit)
        if not annotations.is_absolute() and cfg.data.get("root"):
            annotations = Path(cfg.data.root) / annotations
        image_ids = None
    try:
        return evaluate_coco(
            annotations, path, image_ids=image_ids, backend=cfg.model.get("eval_backend", "faster_coco_eval")
        )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(one_line(err)) from err


def report(evaluation: CocoEvaluation, output_dir: Path, header: str) -> None:
    """Rank 0's outputs of an evaluation: ``metrics.json`` (the 12 numbers and the per-class table), the
    precision-recall plot, and both tables on stdout."""
    write_json_atomic(output_dir / METRICS_FILE, metrics_document(evaluation), indent=2)
    write_pr_plot(evaluation, output_dir / PR_PLOT_FILE)
    print_table(evaluation.metrics, header, evaluation.per_class)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score a checkpoint (``ckpt_path``) or a results file (``detections``) with the COCO protocol.

    Prints the 12-line table and the per-class table, and writes ``metrics.json``, ``precision_recall.png``
    (and, for a checkpoint, ``detections.json``) to the run directory (``paths.output_dir``) on rank 0.
    Returns the 12 metrics.
    """

    install_ddp_sweep_support()
    quiet_known_warnings()
    check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("detections"):
        evaluation = score_detections_file(cfg, pl.seed_everything(cfg.get("seed"), workers=True))
        report(evaluation, output_dir, f"COCO evaluation of {cfg.detections}:")
        return evaluation.metrics

    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        raise ConfigError(
            "evaluate.py needs ckpt_path=CHECKPOINT (train.py .ckpt or NVIDIA .pt) or detections=RESULTS.json"
        )
    with JobScope():
        seed = pl.seed_everything(cfg.get("seed"), workers=True)
        module = load_for_evaluation(cfg, str(ckpt_path))
        prepare_synthetic(cfg)
        datamodule = build_datamodule(cfg, seed)
        check_data_classes(str(ckpt_path), module, datamodule)
        loggers = instantiate_loggers(cfg)
        callbacks = instantiate_callbacks(cfg, have_logger=bool(loggers)) + [ModelSummaryPrinter()]
        trainer = build_trainer(cfg, callbacks, loggers)
        try:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        except SIGTERMException:  # preempted: exit 143 (not 0: nothing was written)
            exit_preempted(trainer)
        metrics = dict(module.val_metrics or {})
        if trainer.is_global_zero:
            write_json_atomic(output_dir / DETECTIONS_FILE, module.val_detections or [])
            report(module.val_evaluation, output_dir, f"COCO evaluation of {ckpt_path}:")
        return metrics
