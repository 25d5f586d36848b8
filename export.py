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

from ssd_lightning import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from ssd_lightning.inference import export

    cli.main(export, cfg)


if __name__ == "__main__":
    main()
