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

from ssd_lightning import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from ssd_lightning.inference import predict

    cli.main(predict, cfg)


if __name__ == "__main__":
    main()
