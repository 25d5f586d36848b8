"""What every task builds from the composed config: data module, SSDModule, loggers, callbacks, Trainer.

Also the ``${ssd.cpu_precision:}`` config resolver, the synthetic set of ``experiment=quickstart`` (written
once, by rank 0), the torchrun world-size check and the CSV logger's earlier ``metrics.csv`` (kept, not
erased, when a run directory is used again).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ssd_lightning.checkpoints import check_num_classes
from ssd_lightning.data.synthetic import ensure_synthetic_coco_on_rank
from ssd_lightning.errors import ConfigError
from ssd_lightning.training.sigterm import use_agreed_sigterm

log = logging.getLogger("ssd_lightning")


def cpu_precision() -> str:
    """``bf16-mixed`` on CPUs with native bfloat16 (AMX or AVX512-BF16: 2-3x faster training), else
    ``32-true``. The config resolver ``${ssd.cpu_precision:}`` (``experiment=quickstart``'s precision).
    """
    try:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # pragma: no cover - older torch
        native = False
    return "bf16-mixed" if native else "32-true"


OmegaConf.register_new_resolver("ssd.cpu_precision", cpu_precision, replace=True)


def global_rank_from_env() -> int:
    """This process's global rank before Lightning sets anything up, read in Lightning's own order."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def prepare_synthetic(cfg: DictConfig) -> None:
    """Write the synthetic set of ``cfg.synthetic`` when ``data.root`` is its folder (rank 0; others wait)."""
    synthetic = cfg.get("synthetic")
    if not synthetic:
        return

    params = OmegaConf.to_container(synthetic, resolve=True)
    root = Path(params.pop("root"))
    data_root = cfg.data.get("root")
    if data_root is None or Path(data_root).resolve() != root.resolve():
        return  # experiment=quickstart data.root=DIR: the recipe on another folder
    for key in ("image_size", "size_range", "objects_per_image", "object_scale"):
        if params.get(key) is not None:
            params[key] = tuple(params[key])
    if global_rank_from_env() == 0:
        log.info("synthetic data set: %s (%s)", root, ", ".join(f"{k}={v}" for k, v in params.items()))
    ensure_synthetic_coco_on_rank(root, global_rank_from_env(), **params)


def build_datamodule(cfg: DictConfig, seed: int) -> pl.LightningDataModule:
    """The data module of ``cfg.data``; ``data.seed: null`` takes the run's seed."""
    kwargs = {"seed": int(seed)} if cfg.data.get("seed") is None else {}
    return hydra.utils.instantiate(cfg.data, _convert_="all", **kwargs)


def dataset_categories(datamodule: Any) -> Any:
    """The data set's ``CategoryMap`` (reads the annotation files if the data module is not set up yet)."""
    categories = getattr(datamodule, "categories", None)
    if categories is None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        categories = datamodule.categories
    return categories


def build_module(cfg: DictConfig, datamodule: Any) -> pl.LightningModule:
    """The LightningModule of ``cfg.model`` with ``cfg.optim``, sized to the data set's categories."""
    categories = dataset_categories(datamodule)
    return instantiate_module(
        cfg,
        check_num_classes(cfg.model.get("num_classes"), len(categories.dataset_ids)),
        category_ids=[int(i) for i in categories.dataset_ids],
        class_names=[str(n) for n in categories.names],
    )


def instantiate_module(cfg: DictConfig, num_classes: int, **kwargs: Any) -> pl.LightningModule:
    """``cfg.model`` with ``cfg.optim``, ``num_classes`` classes and the per-device ``cfg.data.batch_size``;
    ``kwargs`` override model keys."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True) if cfg.get("optim") is not None else {}
    return hydra.utils.instantiate(
        cfg.model,
        _convert_="all",
        num_classes=int(num_classes),
        batch_size=int(cfg.data.batch_size),
        **kwargs,
        **optim,
    )


def instantiate_loggers(cfg: DictConfig) -> list[Any]:
    """Loggers of ``cfg.logger`` (a dict of ``_target_`` configs; empty/None: no logger)."""
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None or "_target_" not in conf:
            raise ConfigError(f"logger.{name} has no _target_; pick loggers with logger=[csv,tensorboard]")
        if str(conf["_target_"]).endswith("MLFlowLogger") and global_rank_from_env() == 0:
            ensure_mlflow_experiment(conf)
        loggers.append(hydra.utils.instantiate(conf, _convert_="all"))
    return loggers


def ensure_mlflow_experiment(conf: Any) -> None:
    """Create the MLflow experiment of an ``MLFlowLogger`` config when its store does not have it yet, with
    one INFO line (Lightning would create it with a warning that reads like trouble on every first run)."""
    # lazy: mlflow is the optional extra behind logger=mlflow, imported only when that logger is configured
    from mlflow import MlflowClient

    tracking_uri, name = conf.get("tracking_uri"), conf.get("experiment_name", "lightning_logs")
    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=conf.get("artifact_location"))
        log.info("MLflow experiment %r created in %s", name, client.tracking_uri)


def instantiate_callbacks(cfg: DictConfig, have_logger: bool) -> list[pl.Callback]:
    """Callbacks of ``cfg.callbacks``; the learning-rate monitor is left out when no logger is configured."""
    callbacks = []
    for name, conf in (cfg.get("callbacks") or {}).items():
        if conf is None:
            continue
        if "_target_" not in conf:  # e.g. settings an experiment gives a callback this config leaves out
            log.debug("callbacks.%s has no _target_: skipped", name)
            continue
        if not have_logger and str(conf["_target_"]).endswith("LearningRateMonitor"):
            log.info("no logger configured: callbacks.%s (LearningRateMonitor) left out", name)
            continue
        callbacks.append(hydra.utils.instantiate(conf, _convert_="all"))
    return callbacks


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any], **overrides: Any
) -> pl.Trainer:
    """The ``pytorch_lightning.Trainer`` of ``cfg.trainer`` (``overrides``: Trainer arguments that replace
    the config's), with :func:`resolved_trainer_settings` applied."""
    keys = ("accelerator", "devices", "num_nodes", "strategy", "benchmark", "deterministic")
    view = {k: overrides[k] if k in overrides else cfg.trainer.get(k) for k in keys}
    settings = {**resolved_trainer_settings(view, torch.cuda.is_available()), **overrides}
    trainer = hydra.utils.instantiate(
        cfg.trainer, _convert_="all", callbacks=callbacks, logger=loggers or False, **settings
    )
    check_torchrun_world_size(trainer)
    use_agreed_sigterm(trainer)
    return trainer


def resolved_trainer_settings(trainer: Any, cuda_available: bool) -> dict[str, Any]:
    """Trainer arguments the config leaves to be decided by the machine.

    * ``benchmark: null`` (cuDNN autotuning) becomes true when the trainer runs on CUDA (``accelerator``
      ``gpu``/``cuda``, or ``auto`` with CUDA available) and ``deterministic`` is not set, as NVIDIA's
      training always does: the convolution algorithms are timed once per input shape, and SSD300's shapes
      are fixed.
    * A DDP strategy (``trainer=ddp``'s tuned ``DDPStrategy``) with one process (``devices=1``,
      ``num_nodes=1``) becomes ``auto``: no process group and no DDP wrapper for a single device.
    """
    out: dict[str, Any] = {}
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda_available)
    if trainer.get("benchmark") is None and on_cuda and not trainer.get("deterministic"):
        out["benchmark"] = True
    strategy = trainer.get("strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, Mapping) else ""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    one_device = str(devices) == "1" if isinstance(devices, (int, str)) else len(list(devices)) == 1
    if target.endswith("DDPStrategy") and one_device and str(nodes) == "1":
        out["strategy"] = "auto"
    return out


def check_torchrun_world_size(trainer: pl.Trainer) -> None:
    """Under torchrun, ``trainer.devices x trainer.num_nodes`` must be the number of processes it started.

    Lightning reads torchrun's environment (``TorchElasticEnvironment``) only for a distributed strategy: with
    ``devices=1 num_nodes=1`` every process would silently train a model of its own.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_torchelastic_launched()):
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.world_size == world:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    raise ConfigError(
        f"torchrun started {world} processes ({local} per node) but trainer.devices={trainer.num_devices} x "
        f"trainer.num_nodes={trainer.num_nodes} is {trainer.world_size}: set trainer.devices={local} "
        f"trainer.num_nodes={max(world // max(local, 1), 1)}"
    )


def keep_previous_metrics(cfg: Any) -> list[Path]:
    """Rename ``metrics.csv`` of the configured CSV loggers to ``metrics.<n>.csv`` when it exists: a run
    directory used again (a fixed ``hydra.run.dir``, a requeued SLURM job) keeps what the earlier attempt
    logged (Lightning's CSVLogger deletes ``metrics.csv`` when its folder is not empty). Returns the new
    names."""

    kept = []
    loggers = cfg.get("logger")
    loggers = OmegaConf.to_container(loggers, resolve=True) if OmegaConf.is_config(loggers) else loggers
    for conf in (loggers or {}).values() if isinstance(loggers, Mapping) else ():
        if not isinstance(conf, Mapping) or not str(conf.get("_target_", "")).endswith("CSVLogger"):
            continue
        version = conf.get("version")
        if version is None or not isinstance(conf.get("save_dir"), str):
            continue  # a new version_N folder per run: nothing is overwritten
        log_dir = Path(conf["save_dir"]) / str(conf.get("name", "lightning_logs")) / str(version)
        metrics = log_dir / "metrics.csv"
        if metrics.is_file():
            n = 1
            while (log_dir / f"metrics.{n}.csv").exists():
                n += 1
            metrics.rename(log_dir / f"metrics.{n}.csv")
            kept.append(log_dir / f"metrics.{n}.csv")
            log.info("%s of an earlier attempt in this run directory kept as %s", metrics, kept[-1].name)
    return kept
