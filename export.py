"""Export the network to ONNX, TorchScript or torch.export, checked against PyTorch before success.

Examples::

    python export.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt            # ONNX
    python export.py ckpt_path=nvidia_ssdpyt_amp_200703.pt format=torchscript output=ssd300.pt
    python export.py ckpt_path=best.ckpt format=exported_program

Prints the largest difference between the exported file and PyTorch on random input. Configuration:
``conf/export.yaml``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ssd_lightning.runtime.entry import run_entry_point, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    # lazy: torch, Lightning and DALI load once Hydra has composed the config (a config error is instant)
    from ssd_lightning.tasks.export import export

    run_task(export, cfg)


if __name__ == "__main__":
    # Hydra's config errors and the errors a user can cause end in one line: ssd_lightning.runtime.entry
    run_entry_point(main)
