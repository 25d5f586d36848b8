"""COCO-format data through NVIDIA DALI, split by job.

* :mod:`.layout`: where a split's images and annotation file are (``data.root``, per-split overrides);
* :mod:`.annotations`: reading, validating and repairing an annotation file;
* :mod:`.image_check`: the up-front image file checks;
* :mod:`.pipelines`: the DALI graphs (NVIDIA's SSD augmentations, ``box_encoder``);
* :mod:`.sharding`: shard math, per-epoch orders and seeds, device placement per rank;
* :mod:`.loaders`: the per-epoch DALI iterables Lightning iterates;
* :mod:`.datamodule`: :class:`COCODataModule`, the LightningDataModule that ties them together;
* :mod:`.synthetic`: the built-in synthetic shapes set.

Category maps live one layer down in :mod:`ssd_lightning.categories`, the errors in
:mod:`ssd_lightning.errors`.
"""

from ssd_lightning.categories import CategoryMap
from ssd_lightning.data.datamodule import COCODataModule
from ssd_lightning.data.synthetic import ensure_synthetic_coco, write_synthetic_coco
from ssd_lightning.errors import DataError, DataWarning

__all__ = [
    "COCODataModule",
    "CategoryMap",
    "DataError",
    "DataWarning",
    "ensure_synthetic_coco",
    "write_synthetic_coco",
]
