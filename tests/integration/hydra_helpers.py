"""Compose the real Hydra config (conf/) as the entry points see it."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"

# a tiny, fast version of the quickstart recipe on the session's synthetic set (tests/conftest.py)
TINY = [
    "experiment=quickstart",
    "data.batch_size=4",
    "data.num_threads=1",
    "trainer.max_epochs=2",
    # epochs, not the quickstart's step budget: with max_steps set, Lightning 2.6.6 resumes an epoch-end
    # checkpoint as "restarted on epoch end" and counts that epoch twice (docs/ARCHITECTURE.md, trap 39)
    "trainer.max_steps=-1",
    "optim.warmup_steps=2",
    "optim.milestones=[8]",  # never reached (the quickstart's fraction 0.8 would decay at epoch 2 of 3)
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.log_every_n_steps=1",
    # no validation pictures (about 1 s per validation; test_pictures_loggers.py turns them on)
    "callbacks.pictures.num_images=0",
]
# two DDP processes on the CPU (Lightning starts rank 1), batch 2 per rank: 3 steps per epoch on the test set
TWO_CPU_RANKS = [
    "data.batch_size=2",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, as ``@hydra.main`` would give it to the task function.

    ``output_dir`` plays the Hydra run directory (``paths.output_dir``); the Hydra config is registered so
    that ``${hydra:...}`` interpolations and ``HydraConfig.get()`` work as in a real run.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        if output_dir is not None:
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.paths.output_dir = str(output_dir)
        cfg.hydra.job.name = config_name
        if cfg.hydra.mode is None:
            cfg.hydra.mode = "RUN"
    HydraConfig.instance().set_config(cfg)
    return cfg
