"""The pictures of ``predict.py`` as a LightningDataModule: decoded with PIL, one contiguous shard per rank.

Not DALI: DALI aborts its whole pipeline on one corrupt file without naming it. Here each file is decoded
with :func:`ssd_lightning.images.read_image` (any mode PIL reads, to RGB) and preprocessed as the validation
pipeline (:func:`ssd_lightning.images.preprocess`); an unreadable file is passed on with its reason, and the
prediction writer reports and skips it.

Under DDP every rank takes the contiguous shard :func:`~ssd_lightning.data.sharding.shard_range` of the file
list (sizes differ by at most one), so each file is predicted exactly once; no padding sampler (a
``DistributedSampler`` repeats files to even out the shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from ssd_lightning.data.sharding import shard_range
from ssd_lightning.images import INPUT_SIZE, preprocess, read_image

__all__ = ["Picture", "PictureDataset", "PicturesDataModule", "collate_pictures"]


@dataclass
class Picture:
    """One input file: ``index`` in the file list; ``image`` uint8 ``[3, H, W]`` (original) and ``tensor``
    float32 ``[3, 300, 300]`` (preprocessed), or ``error`` (why the file was not readable)."""

    index: int
    path: Path
    image: torch.Tensor | None = None
    tensor: torch.Tensor | None = None
    error: str | None = None


def decode_picture(index: int, path: Path) -> Picture:
    """Read and preprocess ``path``; any decoding failure becomes ``Picture.error`` (never raises)."""
    try:
        image = read_image(path)
        return Picture(index, path, image, preprocess(image))
    except Exception as err:  # noqa: BLE001 - any decoding failure skips the file
        if isinstance(err, UnidentifiedImageError):
            reason = "not an image file (or a format PIL cannot read)"
        else:
            reason = f"not a readable image ({' '.join(str(err).split()) or type(err).__name__})"
        return Picture(index, path, error=reason)


class PictureDataset(Dataset):
    """``files[i]`` decoded by :func:`decode_picture`."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = [Path(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Picture:
        return decode_picture(index, self.files[index])


def collate_pictures(pictures: Sequence[Picture]) -> dict[str, Any]:
    """A batch for ``predict_step`` and the prediction writer.

    ``images``: float32 ``[N, 3, 300, 300]`` of the readable pictures (N may be 0), the only tensor (the one
    thing Lightning moves to the device); ``index`` (their places in the file list), ``paths``, ``sizes``
    (original ``(height, width)``), ``originals`` (uint8 ``[H, W, 3]`` numpy arrays, for the drawings):
    lists of N; ``failed``: ``(index, path, reason)`` of the unreadable files.
    """
    good = [p for p in pictures if p.error is None]
    if good:
        images = torch.stack([p.tensor for p in good])
    else:
        images = torch.empty(0, 3, INPUT_SIZE, INPUT_SIZE)
    return {
        "images": images,
        "index": [p.index for p in good],
        "paths": [str(p.path) for p in good],
        "sizes": [(int(p.image.shape[1]), int(p.image.shape[2])) for p in good],
        "originals": [p.image.permute(1, 2, 0).numpy() for p in good],
        "failed": [(p.index, str(p.path), p.error) for p in pictures if p.error is not None],
    }


class PicturesDataModule(pl.LightningDataModule):
    """``predict_dataloader``: this rank's shard of ``files`` in file order, ``batch_size`` per batch,
    decoded in ``num_workers`` loader processes (0: in the main process)."""

    def __init__(self, files: Sequence[Path], batch_size: int = 8, num_workers: int = 2) -> None:
        super().__init__()
        self.dataset = PictureDataset(files)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)

    def shard(self, rank: int, world_size: int) -> range:
        """The file indices rank ``rank`` of ``world_size`` predicts."""
        return shard_range(len(self.dataset), rank, world_size)

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(
            Subset(self.dataset, list(self.shard(rank, world))),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_pictures,
        )
