"""Train SSD300 (NVIDIA SSD300 v1.1 recipe by default): ``python train.py [overrides]``.

Examples::

    python train.py data.root=/coco                               # the 65-epoch NVIDIA recipe, 1 device
    python train.py experiment=nvidia_v1_1 data.root=/coco trainer.devices=8   # AMP, 8 GPUs (DDP)
    python train.py experiment=quickstart                         # synthetic set on CPU, < 10 minutes
    python train.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt   # resume that run (its config)
    python train.py ckpt_path=last trainer.max_steps=640          # the newest run, longer
    python train.py -m optim.lr=2e-3,3e-3                         # a sweep, one job directory per value
    python train.py hparams_search=optuna experiment=quickstart   # Optuna search over lr/warmup/weight decay

Configuration: ``conf/train.yaml``; ``python train.py --help`` lists the groups and the composed config.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssd_lightning.runtime.entry import run_entry_point, run_task
from ssd_lightning.runtime.resume import restore_refused_run, resume_argv


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # lazy: torch, Lightning and DALI load once Hydra has composed the config (a config error is instant)
    from ssd_lightning.tasks.train import train_task

    # a sweep optimises the value returned here (optimized_metric, val/AP by default)
    return run_task(train_task, cfg)


def resume_then_main() -> float | None:
    # ckpt_path=<a run's checkpoint>: that run's overrides, then these, in its directory (before composing)
    sys.argv = resume_argv(sys.argv, Path(__file__).resolve().parent / "conf")
    try:
        return main()
    finally:
        restore_refused_run()  # a resume refused before training: the run's .hydra/ as it was


if __name__ == "__main__":
    # Hydra's config errors and the errors a user can cause end in one line: ssd_lightning.runtime.entry
    run_entry_point(resume_then_main)
