"""Detect objects in pictures: ``python predict.py ckpt_path=CHECKPOINT input=PATH [overrides]``.

Examples::

    python predict.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt input=photos/
    python predict.py ckpt_path=nvidia_ssdpyt_amp_200703.pt input='photos/**/*.jpg' score_threshold=0.5
    python predict.py ckpt_path=best.ckpt input=street.png hydra.run.dir=out/street

Writes ``detections.json`` (COCO results, original pixels), ``images.json`` and ``images/<name>.png`` (boxes,
class names and scores drawn) to the run directory. Configuration: ``conf/predict.yaml``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ssd_lightning.runtime.entry import run_entry_point, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    # lazy: torch, Lightning and DALI load once Hydra has composed the config (a config error is instant)
    from ssd_lightning.tasks.predict import predict

    run_task(predict, cfg)


if __name__ == "__main__":
    # Hydra's config errors and the errors a user can cause end in one line: ssd_lightning.runtime.entry
    run_entry_point(main)
