"""COCO-format data through NVIDIA DALI: the LightningDataModule, the DALI graphs, annotation checks,
synthetic set.

``COCODataModule`` is the entry point (see :mod:`ssd_lightning.data.datamodule` for the batch formats).
"""

from ssd_lightning.data.coco import CategoryMap, DataError, DataWarning
from ssd_lightning.data.datamodule import COCODataModule
from ssd_lightning.data.synthetic import ensure_synthetic_coco, write_synthetic_coco

__all__ = [
    "COCODataModule",
    "CategoryMap",
    "DataError",
    "DataWarning",
    "ensure_synthetic_coco",
    "write_synthetic_coco",
]
