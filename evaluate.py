"""COCO evaluation of a checkpoint or a results file: ``python evaluate.py ckpt_path=...|detections=...``.

Examples::

    python evaluate.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt data.root=/coco
    python evaluate.py ckpt_path=nvidia_ssdpyt_amp_200703.pt data.root=/coco trainer.devices=2
    python evaluate.py detections=detections.json data.root=/coco

Prints the 12-line COCO table and writes ``detections.json`` and ``metrics.json`` to the run directory.
Configuration: ``conf/evaluate.yaml``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ssd_lightning.runtime.entry import run_entry_point, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    # lazy: torch, Lightning and DALI load once Hydra has composed the config (a config error is instant)
    from ssd_lightning.tasks.evaluate import evaluate

    metrics = run_task(evaluate, cfg)
    return metrics.get("AP")


if __name__ == "__main__":
    # Hydra's config errors and the errors a user can cause end in one line: ssd_lightning.runtime.entry
    run_entry_point(main)
