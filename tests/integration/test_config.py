"""Every config group option and every experiment composes, and what it describes can be instantiated."""

from __future__ import annotations

import datetime

import hydra
import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelSummary
from pytorch_lightning.strategies import DDPStrategy

from ssd_lightning.data import COCODataModule
from ssd_lightning.runtime.builders import (
    build_datamodule,
    build_module,
    build_trainer,
    instantiate_callbacks,
    instantiate_loggers,
)
from ssd_lightning.training.callbacks import ValidationSchedule
from ssd_lightning.training.module import SSDModule

from .hydra_helpers import CONF_DIR, compose_config


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_the_groups_have_their_options():
    assert {"default", "cpu", "gpu", "ddp"} <= set(_options("trainer"))
    assert _options("data") == ["coco"] and _options("model") == ["ssd300"]
    assert {"csv", "tensorboard"} <= set(_options("logger"))
    assert {"default", "model_checkpoint", "progress_bar"} <= set(_options("callbacks"))
    assert {"nvidia_v1_1", "quickstart"} <= set(_options("experiment"))
    assert "optuna" in _options("hparams_search")


def _cpu(cfg) -> None:
    """Make a GPU trainer config instantiable on this CPU-only machine."""
    cfg.trainer.accelerator = "cpu"
    cfg.trainer.precision = "32-true"
    cfg.trainer.devices = 1


@pytest.mark.parametrize("config_name", ["train", "evaluate"])
@pytest.mark.parametrize("experiment", [None, "quickstart", "nvidia_v1_1"])
def test_configs_and_experiments_instantiate(config_name, experiment, synthetic_coco, tmp_path):
    overrides = [f"data.root={synthetic_coco}", "model.backbone_weights=null"]
    if experiment:
        overrides.append(f"experiment={experiment}")
    cfg = compose_config(config_name, overrides, tmp_path)
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    _cpu(cfg)
    datamodule = build_datamodule(cfg, seed=0)
    assert isinstance(datamodule, COCODataModule) and datamodule.seed == (
        cfg.seed if cfg.seed is not None else 0
    )
    loggers = instantiate_loggers(cfg)
    callbacks = instantiate_callbacks(cfg, have_logger=bool(loggers))
    trainer = build_trainer(cfg, callbacks, loggers)
    assert isinstance(trainer, pl.Trainer)
    if config_name == "train":
        module = build_module(cfg, datamodule)
        assert isinstance(module, SSDModule)
        assert module.hparams.num_classes == 4  # the synthetic set's 3 categories + background
        assert module.hparams.category_ids == [3, 7, 11]
        assert module.hparams.lr == cfg.optim.lr and module.hparams.milestones == list(cfg.optim.milestones)
        assert any(isinstance(c, ValidationSchedule) for c in callbacks)
        assert trainer.checkpoint_callback is not None


def test_nvidia_recipe_values(tmp_path):
    cfg = compose_config("train", ["experiment=nvidia_v1_1"], tmp_path)
    assert cfg.model.backbone == "resnet50" and cfg.model.backbone_weights == "imagenet_v1"
    assert cfg.optim.lr == 2.6e-3 and cfg.optim.reference_batch_size == 32
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert list(cfg.optim.milestones) == [43, 54] and cfg.optim.gamma == 0.1 and cfg.optim.warmup_steps == 300
    assert cfg.trainer.max_epochs == 65 and cfg.trainer.precision == "16-mixed"
    assert list(cfg.callbacks.validation_schedule.epochs) == [21, 31, 37, 42, 48, 53, 59, 64]
    assert cfg.model.score_threshold == 0.05 and cfg.model.nms_iou_threshold == 0.5
    assert cfg.model.max_detections == 200 and cfg.data.batch_size == 64
    # the plain default is NVIDIA's command-line default recipe
    default = compose_config("train", [], tmp_path)
    assert default.trainer.max_epochs == 65 and default.data.batch_size == 32 and default.optim.lr == 2.6e-3


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp"])
def test_trainer_options(trainer, tmp_path):
    cfg = compose_config("train", [f"trainer={trainer}"], tmp_path)
    assert cfg.trainer.num_sanity_val_steps == 0 and cfg.trainer.use_distributed_sampler is False
    expected = {"default": "auto", "cpu": "cpu", "gpu": "gpu", "ddp": "gpu"}[trainer]
    assert cfg.trainer.accelerator == expected
    if trainer == "ddp":
        assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
        ddp = compose_config("train", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                       "trainer.precision=32-true"], tmp_path)  # fmt: skip
        t = build_trainer(ddp, [], [])
        assert t.num_devices == 2 and type(t.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "[csv,tensorboard]"])
def test_loggers(logger, tmp_path):
    cfg = compose_config("train", [f"logger={logger}"], tmp_path)
    loggers = instantiate_loggers(cfg)
    assert len(loggers) == logger.count(",") + 1
    assert all(str(lg.log_dir).startswith(str(tmp_path)) for lg in loggers)


@pytest.mark.parametrize("option", ["default", "evaluate", "none", "rich_progress_bar", "model_checkpoint"])
def test_callback_options(option, tmp_path):
    cfg = compose_config("train", [f"callbacks={option}"], tmp_path)
    callbacks = instantiate_callbacks(cfg, have_logger=True)
    assert all(isinstance(c, pl.Callback) for c in callbacks)
    if option == "default":
        names = sorted(type(c).__name__ for c in callbacks)
        expected = ["LinkedCheckpoint", "LinkedCheckpoint", "TQDMProgressBar"]
        reliability = ["PreemptionCheckpoint", "NonFiniteGuard", "CheckpointSpaceCheck", "RNGState"]
        assert names == sorted(
            [*expected, "ValidationSchedule", "ValidationPictures", *reliability, "FastPathCallback"]
        )


@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_one_model_summary_and_one_learning_rate_log(script, tmp_path):
    """Lightning's ModelSummary ("FLOPs 0") is off, so ours (ModelSummaryPrinter, real FLOPs) is the only
    one; the learning rate is logged by the module (train/lr), not by a LearningRateMonitor as well."""
    cfg = compose_config(script, [], tmp_path)
    trainer = build_trainer(cfg, instantiate_callbacks(cfg, have_logger=True), [])
    assert not [c for c in trainer.callbacks if isinstance(c, (ModelSummary, LearningRateMonitor))]


def test_ddp_timeout_is_a_config_key(tmp_path):
    cfg = compose_config("train", ["trainer=ddp", "trainer.strategy.timeout.seconds=600"], tmp_path)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == datetime.timedelta(seconds=600)
    default = compose_config("train", ["trainer=ddp"], tmp_path).trainer.strategy.timeout.seconds
    assert default == 1800  # the README's figure (Lightning's and torch's default)


def test_optuna_search_composes(tmp_path):
    cfg = compose_config("train", ["hparams_search=optuna", "experiment=quickstart"], tmp_path)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optim.lr", "optim.warmup_steps", "optim.weight_decay"}
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.optimized_metric == "val/AP"


def test_paths_and_run_dirs(tmp_path):
    cfg = compose_config("train", ["experiment=quickstart"], tmp_path)
    assert cfg.data.root == cfg.synthetic.root == "./data/synthetic"
    assert cfg.callbacks.last_checkpoint.dirpath == f"{tmp_path}/checkpoints"
    assert cfg.hydra.run.dir.startswith("./outputs/train/runs/")
    assert cfg.hydra.sweep.dir.startswith("./outputs/train/multiruns/")
    evaluation = compose_config("evaluate", ["experiment=quickstart"], tmp_path)
    assert evaluation.hydra.run.dir.startswith("./outputs/evaluate/runs/")
    other = compose_config("train", ["experiment=quickstart", "data.root=/somewhere"], tmp_path)
    assert other.data.root == "/somewhere" and other.synthetic.root == "./data/synthetic"


def test_validation_schedule():
    nvidia = ValidationSchedule(epochs=[21, 31, 37, 42, 48, 53, 59, 64])
    assert [e for e in range(65) if nvidia.should_validate(e, 65)] == [21, 31, 37, 42, 48, 53, 59, 64]
    every5 = ValidationSchedule()
    every5._every = 5
    assert [e for e in range(12) if every5.should_validate(e, 12)] == [4, 9, 11]  # + the last epoch
    no_final = ValidationSchedule(final=False)
    no_final._every = 5
    assert [e for e in range(12) if no_final.should_validate(e, 12)] == [4, 9]


def test_slurm_launcher_composes(tmp_path):
    cfg = compose_config(
        "train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"], tmp_path
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
