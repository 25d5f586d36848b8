"""ssd_lightning: NVIDIA SSD300 v1.1 as a PyTorch Lightning + Hydra project fed by NVIDIA DALI.

The layers, lowest first, and what each may import: ``docs/ARCHITECTURE.md``.
"""

from ssd_lightning.checkpoints import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
