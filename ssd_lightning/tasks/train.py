"""``train.py``: train (or resume) SSD300 as the composed config says and print the final COCO table.

The order of things: config checks, seed, the synthetic set (quickstart), the data module, the SSDModule sized
to the data set's categories, loggers and callbacks, the Trainer, ``ckpt_path`` resolved and checked, then
``Trainer.fit``. A SIGTERM becomes a checkpoint and exit code 143; in a sweep each job cleans up after itself
(:class:`~ssd_lightning.runtime.ddp_sweeps.JobScope`).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssd_lightning.checkpoints import check_resume, resolve_ckpt_path
from ssd_lightning.runtime.builders import (
    build_datamodule,
    build_module,
    build_trainer,
    global_rank_from_env,
    instantiate_callbacks,
    instantiate_loggers,
    keep_previous_metrics,
    prepare_synthetic,
)
from ssd_lightning.runtime.config_check import check_config
from ssd_lightning.runtime.ddp_sweeps import JobScope, in_multirun, install_ddp_sweep_support
from ssd_lightning.runtime.results import metric_value, print_table, quiet_known_warnings
from ssd_lightning.runtime.resume import accept_resumed_run, log_resumed_run
from ssd_lightning.training.callbacks import ModelSummaryPrinter, exit_preempted
from ssd_lightning.training.peers import PeerLossReport, install_peer_loss_observer, peer_loss_error

log = logging.getLogger("ssd_lightning")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train (or resume, with ``ckpt_path``) as ``cfg`` says; print the final COCO AP table on rank 0.

    Returns:
        the final logged metrics (``trainer.callback_metrics`` as floats: train/loss, val/AP, ...) and the
        objects built (cfg, datamodule, model, callbacks, loggers, trainer).
    """

    install_ddp_sweep_support()
    install_peer_loss_observer()
    quiet_known_warnings()
    if global_rank_from_env() == 0:
        log_resumed_run()  # train.py ckpt_path=<a run's checkpoint>: that run, and the overrides given now
    check_config(cfg)
    with JobScope():
        seed = pl.seed_everything(cfg.get("seed"), workers=True)
        prepare_synthetic(cfg)
        datamodule = build_datamodule(cfg, seed)
        model = build_module(cfg, datamodule)
        if global_rank_from_env() == 0:
            keep_previous_metrics(cfg)  # a run directory used again (requeue): the CSV logger would erase it
        loggers = instantiate_loggers(cfg)
        callbacks = instantiate_callbacks(cfg, have_logger=bool(loggers)) + [
            ModelSummaryPrinter(),
            PeerLossReport(),
        ]
        trainer = build_trainer(cfg, callbacks, loggers)
        ckpt_path = resolve_ckpt_path(
            cfg, multirun=in_multirun()
        )  # ckpt_path=last: the newest last.ckpt (or none)
        if ckpt_path:
            check_resume(ckpt_path, model.hparams)
        accept_resumed_run()  # train.py ckpt_path=<a run's checkpoint>: its merged config is the run's now
        try:
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path or None)
        except SIGTERMException:  # preempted: the checkpoint is written (PreemptionCheckpoint), exit 143
            exit_preempted(trainer)
        except Exception as err:  # a dead DDP rank: one line naming it and the resume (PeerLossReport)
            lost = peer_loss_error(callbacks)
            if lost is None:
                raise
            raise lost from err
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero and getattr(model, "val_metrics", None):
            print_table(model.val_metrics, f"COCO evaluation after {trainer.current_epoch} epochs:")
            best = trainer.checkpoint_callbacks
            for callback in best:
                if callback.monitor and callback.best_model_path:
                    log.info(
                        "best checkpoint (%s %.4f): %s",
                        callback.monitor,
                        float(callback.best_model_score or 0),
                        callback.best_model_path,
                    )
        objects = {
            "cfg": cfg,
            "datamodule": datamodule,
            "model": model,
            "callbacks": callbacks,
            "logger": loggers,
            "trainer": trainer,
        }
        return metrics, objects


def train_task(cfg: DictConfig) -> float | None:
    """``train.py``: :func:`train`, returning ``cfg.optimized_metric`` (what a sweeper optimises)."""
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))
