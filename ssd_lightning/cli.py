"""What ``train.py`` and ``evaluate.py`` do, as functions of the composed Hydra config.

The entry points are thin: Hydra composes ``conf/``, :func:`main` runs :func:`train` or :func:`evaluate` and
turns the errors a user can cause into one line on stderr (``error: ...``, exit code 1). Tests call
:func:`train` and :func:`evaluate` directly on a config composed with Hydra's compose API.

Distributed runs: nothing here branches on the world size except printing/writing on rank 0. Lightning starts
the other DDP ranks by re-running the script; inside a Hydra multirun (sweep) each rank is started as a single
run of *that job's* config in *that job's* directory (see :func:`install_ddp_sweep_support`), and the state a
job leaves in the process (process group, launcher environment variables) is cleared before the next job.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssd_lightning.checkpoints import CheckpointError

__all__ = [
    "ConfigError",
    "evaluate",
    "install_ddp_sweep_support",
    "main",
    "metric_value",
    "train",
    "train_task",
]

log = logging.getLogger("ssd_lightning")

# What Lightning's DDP launcher (and seed_everything) put in os.environ for one run.
_LAUNCH_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)
METRICS_FILE = "metrics.json"
DETECTIONS_FILE = "detections.json"


class ConfigError(ValueError):
    """A configuration a user wrote that cannot work (one-line message naming the key and the fix)."""


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


# ----------------------------------------------------------------------------------------------------
# Error handling of the entry points
# ----------------------------------------------------------------------------------------------------


def _user_error_types() -> tuple[type[BaseException], ...]:
    from ssd_lightning.reliability import NonFiniteLossError

    types: list[type[BaseException]] = [ConfigError, CheckpointError, OmegaConfBaseException]
    types.append(NonFiniteLossError)  # training diverged: the checkpoints hold the last good model
    try:
        from ssd_lightning.data import DataError

        types.append(DataError)
    except ImportError:  # pragma: no cover - the data package always defines it
        pass
    return tuple(types)


def user_error(err: BaseException) -> BaseException | None:
    """The user-caused error behind ``err`` (itself, or the cause of a Hydra instantiation error), else None.

    User errors: :class:`ConfigError`, ``CheckpointError``, ``DataError``, OmegaConf errors (missing or wrong
    config values), and a ``ValueError``/``TypeError``/``OSError`` raised while instantiating an object from
    the config (a bad argument value, an unknown key, a missing file).
    """
    from hydra.errors import InstantiationException

    ours = _user_error_types()
    if isinstance(err, ours):
        return err
    if isinstance(err, InstantiationException):
        cause = err.__cause__ or err.__context__
        while isinstance(cause, InstantiationException) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        if isinstance(cause, ours + (ValueError, TypeError, OSError, MisconfigurationException)):
            return cause
        if cause is None:
            return err
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


def main(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``task(cfg)``; a user error ends the process with one line ``error: ...`` on stderr, exit code 1.

    Anything else propagates with its traceback (a bug is not a user error).
    """
    try:
        return task(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {_one_line(cause)}", file=sys.stderr, flush=True)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# DDP inside Hydra sweeps
# ----------------------------------------------------------------------------------------------------


def _hydra_override_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _config_source_args(argv: list[str]) -> list[str]:
    """The ``--config-path/--config-name/--config-dir`` (and short) arguments of a command line."""
    keep: list[str] = []
    flags = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in flags:
            keep.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                keep.append(argv[i + 1])
                i += 1
        i += 1
    return keep


def _hydra_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """The command and cwd that start DDP rank ``local_rank`` of the current Hydra job.

    Lightning's own version re-runs ``sys.argv``: inside a multirun that starts the whole sweep again (other
    directories, other sampled values). This one starts a single run of this job's own overrides in this job's
    output directory; for a single run it equals Lightning's (``sys.argv`` plus the run directory).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        command += _config_source_args(sys.argv[1:]) + list(hydra_cfg.overrides.task)
    else:
        command += sys.argv[1:]
    command += [
        f"hydra.run.dir={_hydra_override_quote(str(hydra_cfg.runtime.output_dir))}",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]
    return command, get_original_cwd()


def install_ddp_sweep_support() -> None:
    """Make Lightning start DDP ranks with the current Hydra job's config (single runs and sweep jobs alike).

    Both ``lightning_fabric``'s launcher module and ``pytorch_lightning``'s (which keeps its own reference to
    the function it imported) are patched. Idempotent.
    """
    import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
    import pytorch_lightning.strategies.launchers.subprocess_script as pl_launcher

    for module in (fabric_launcher, pl_launcher):
        if getattr(module, "_hydra_subprocess_cmd", None) is not _hydra_subprocess_cmd:
            module._hydra_subprocess_cmd = _hydra_subprocess_cmd


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class _JobScope:
    """Undo what one training job leaves in the process, so that the next sweep job starts clean."""

    def __enter__(self) -> _JobScope:
        self.env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
        self.multirun = _in_multirun()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.multirun:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in self.env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def _global_rank_from_env() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def prepare_synthetic(cfg: DictConfig) -> None:
    """Write the synthetic set of ``cfg.synthetic`` when ``data.root`` is its folder (rank 0; others wait)."""
    synthetic = cfg.get("synthetic")
    if not synthetic:
        return
    from ssd_lightning.data.synthetic import ensure_synthetic_coco, is_synthetic_complete

    params = OmegaConf.to_container(synthetic, resolve=True)
    root = Path(params.pop("root"))
    data_root = cfg.data.get("root")
    if data_root is None or Path(data_root).resolve() != root.resolve():
        return  # experiment=quickstart data.root=DIR: the recipe on another folder
    for key in ("image_size", "size_range", "objects_per_image", "object_scale"):
        if params.get(key) is not None:
            params[key] = tuple(params[key])
    if _global_rank_from_env() == 0:
        log.info("synthetic data set: %s (%s)", root, ", ".join(f"{k}={v}" for k, v in params.items()))
        ensure_synthetic_coco(root, **params)
        return
    deadline = time.monotonic() + 1800
    while not is_synthetic_complete(root, **params):
        if time.monotonic() > deadline:
            raise ConfigError(f"rank 0 did not finish writing the synthetic data set in {root}")
        time.sleep(1.0)


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
    data_classes = len(categories.dataset_ids) + 1
    num_classes = cfg.model.get("num_classes")
    if num_classes is None:
        num_classes = data_classes
    elif int(num_classes) < data_classes:
        raise ConfigError(
            f"model.num_classes={num_classes} but the data set has {data_classes - 1} categories "
            f"({data_classes} classes with the background): leave model.num_classes unset (null)"
        )
    return instantiate_module(
        cfg,
        int(num_classes),
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
        loggers.append(hydra.utils.instantiate(conf, _convert_="all"))
    return loggers


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


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    trainer = hydra.utils.instantiate(
        cfg.trainer, _convert_="all", callbacks=callbacks, logger=loggers or False
    )
    check_torchrun_world_size(trainer)
    return trainer


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


def check_resume_checkpoint(path: str | os.PathLike, module: Any) -> None:
    """``path`` must be a train.py checkpoint of the model the config builds (one-line CheckpointError)."""
    from ssd_lightning.checkpoints import read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path {path} not found: pass a train.py checkpoint (<run dir>/checkpoints/last.ckpt)"
        )
    try:
        head = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        head = None  # read_checkpoint below names the problem
    loaded = read_checkpoint(path)
    if not isinstance(head, dict) or "optimizer_states" not in head or "loops" not in head:
        raise CheckpointError(
            f"ckpt_path {path} is not a train.py training checkpoint (no optimizer/loop state) and cannot be "
            "resumed; evaluate it with evaluate.py ckpt_path=..."
        )
    hp = module.hparams
    if loaded.backbone != hp.backbone or loaded.num_classes != hp.num_classes:
        raise CheckpointError(
            f"ckpt_path {path} holds SSD300(backbone={loaded.backbone}, num_classes={loaded.num_classes}) "
            f"but the config builds SSD300(backbone={hp.backbone}, num_classes={hp.num_classes}): resume "
            "with the checkpoint's config (model.backbone, data.root)"
        )
    if (
        loaded.category_ids is not None
        and hp.category_ids is not None
        and loaded.category_ids != hp.category_ids
    ):
        raise CheckpointError(
            f"ckpt_path {path} was trained on other categories (ids {loaded.category_ids[:5]}...) than "
            f"data.root's ({hp.category_ids[:5]}...): resume on the same data set"
        )


def metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    """``metrics[name]`` as a float (what a sweep optimises); None when no name is given, or when the metric
    was not logged outside a sweep (inside one it is an error: the sweeper needs the value)."""
    if not name:
        return None
    if name not in metrics:
        if not _in_multirun():
            log.warning("optimized_metric %s was not logged", name)
            return None
        raise ConfigError(
            f"optimized_metric={name!r} was not logged (logged: {', '.join(sorted(metrics)) or 'nothing'}); "
            "validation must run at least once (it always runs after the last epoch)"
        )
    return float(metrics[name])


def print_table(metrics: Mapping[str, float], header: str | None = None) -> None:
    from ssd_lightning.evaluation import format_table

    if header:
        print(header)
    print(format_table(metrics), flush=True)


class ModelSummaryPrinter(pl.Callback):
    """Print the network's ``Model FLOPs: ... Params: ...`` / ``Model summary: N layers, ...`` lines
    (:func:`ssd_lightning.summary.model_summary`) once, on global rank 0, when training or evaluation starts.

    In ``setup``: the process group exists by then (the rank is right under torchrun, SLURM and Lightning's
    own launcher alike) and the network is not yet wrapped or moved.
    """

    def __init__(self) -> None:
        self.printed = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.printed or not trainer.is_global_zero:
            return
        from ssd_lightning.summary import model_summary

        print(model_summary(getattr(pl_module, "model", pl_module)), flush=True)
        self.printed = True


# ----------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------


def _quiet_known_warnings() -> None:
    # Training metrics are rank 0's (as NVIDIA logs them); val/* are identical on every rank by construction.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train (or resume, with ``ckpt_path``) as ``cfg`` says; print the final COCO AP table on rank 0.

    Returns:
        the final logged metrics (``trainer.callback_metrics`` as floats: train/loss, val/AP, ...) and the
        objects built (cfg, datamodule, model, callbacks, loggers, trainer).
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ssd_lightning.reliability import (
        check_config,
        exit_preempted,
        keep_previous_metrics,
        resolve_ckpt_path,
    )

    install_ddp_sweep_support()
    _quiet_known_warnings()
    check_config(cfg)
    with _JobScope():
        seed = pl.seed_everything(cfg.get("seed"), workers=True)
        prepare_synthetic(cfg)
        datamodule = build_datamodule(cfg, seed)
        model = build_module(cfg, datamodule)
        if _global_rank_from_env() == 0:
            keep_previous_metrics(cfg)  # a run directory used again (requeue): the CSV logger would erase it
        loggers = instantiate_loggers(cfg)
        callbacks = instantiate_callbacks(cfg, have_logger=bool(loggers)) + [ModelSummaryPrinter()]
        trainer = build_trainer(cfg, callbacks, loggers)
        ckpt_path = resolve_ckpt_path(cfg)  # ckpt_path=last: the newest last.ckpt (or none)
        if ckpt_path:
            check_resume_checkpoint(ckpt_path, model)
        try:
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path or None)
        except SIGTERMException:  # preempted: the checkpoint is written (PreemptionCheckpoint), exit 143
            exit_preempted(trainer)
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


def _load_for_evaluation(cfg: DictConfig, ckpt_path: str) -> pl.LightningModule:
    from ssd_lightning.checkpoints import read_checkpoint

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
    result = module.model.load_state_dict(loaded.state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        keys = (missing + list(result.unexpected_keys))[:3]
        raise CheckpointError(
            f"{ckpt_path} does not match SSD300(backbone={loaded.backbone}): keys {keys} ..."
        )
    return module


def check_evaluation_classes(ckpt_path: str, module: Any, datamodule: Any) -> None:
    """The checkpoint's classes must be the validation set's categories (else the AP is silently ~0).

    A checkpoint with category ids of its own (train.py) has ``len(category_ids)`` classes, one without
    (NVIDIA, a bare state dict) ``num_classes - 1``, its labels 1..K standing for the data set's categories in
    the annotation file's order. The exception, an NVIDIA COCO checkpoint (81 classes, no ids) on a set with
    the 80 COCO 2017 categories: its labels are the COCO ids in sorted order (NVIDIA's label order), whatever
    order the file lists them in, and the module is given those ids.

    Raises:
        CheckpointError: one line naming the checkpoint, the annotation file and the fix.
    """
    from ssd_lightning.inference import COCO2017_CATEGORY_IDS

    hp = module.hparams
    ann_file = datamodule.val_annotations
    data_ids = [int(i) for i in datamodule._annotations("val").categories.dataset_ids]  # parsed once, cached
    if hp.category_ids is None and sorted(data_ids) == list(COCO2017_CATEGORY_IDS):
        if hp.num_classes == len(COCO2017_CATEGORY_IDS) + 1:
            hp.category_ids = list(COCO2017_CATEGORY_IDS)
            return
    classes = len(hp.category_ids) if hp.category_ids is not None else hp.num_classes - 1
    if classes != len(data_ids):
        raise CheckpointError(
            f"{ckpt_path} has {classes} classes (num_classes={hp.num_classes}) but the dataset {ann_file} "
            f"has {len(data_ids)} categories; evaluate on the dataset it was trained on or fine-tune with "
            f"model.init_from={ckpt_path}"
        )


def score_detections_file(cfg: DictConfig, seed: int) -> dict[str, float]:
    """``evaluate.py detections=FILE``: score a COCO results file against the validation annotations, on
    the images the validation pipeline covers (all the file's images unless ``data.val_include_empty=false``).
    """
    from ssd_lightning.data import DataError
    from ssd_lightning.evaluation import evaluate_detections

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
        return evaluate_detections(
            annotations, path, image_ids=image_ids, backend=cfg.model.get("eval_backend", "faster_coco_eval")
        )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(_one_line(err)) from err


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score a checkpoint (``ckpt_path``) or a results file (``detections``) with the COCO protocol.

    Prints the 12-line table and writes ``metrics.json`` (and, for a checkpoint, ``detections.json``) to the
    run directory (``paths.output_dir``) on rank 0. Returns the 12 metrics.
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ssd_lightning.evaluation import write_json_atomic
    from ssd_lightning.reliability import check_config, exit_preempted

    install_ddp_sweep_support()
    _quiet_known_warnings()
    check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("detections"):
        metrics = score_detections_file(cfg, pl.seed_everything(cfg.get("seed"), workers=True))
        write_json_atomic(output_dir / METRICS_FILE, metrics, indent=2)
        print_table(metrics, f"COCO evaluation of {cfg.detections}:")
        return metrics

    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        raise ConfigError(
            "evaluate.py needs ckpt_path=CHECKPOINT (train.py .ckpt or NVIDIA .pt) or detections=RESULTS.json"
        )
    with _JobScope():
        seed = pl.seed_everything(cfg.get("seed"), workers=True)
        module = _load_for_evaluation(cfg, str(ckpt_path))
        prepare_synthetic(cfg)
        datamodule = build_datamodule(cfg, seed)
        check_evaluation_classes(str(ckpt_path), module, datamodule)
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
            write_json_atomic(output_dir / METRICS_FILE, metrics, indent=2)
            print_table(metrics, f"COCO evaluation of {ckpt_path}:")
        return metrics
