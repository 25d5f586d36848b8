"""Validation detections on their way from the device to rank 0's COCO evaluation: one device-to-host copy per
batch, compact tensors per rank, one message per rank to rank 0 (no gather to every rank), COCO rows made on
rank 0 only. Used by :class:`~ssd_lightning.training.module.SSDModule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ssd_lightning.evaluation import detections_to_coco

__all__ = ["HostDetections", "coco_rows", "concat_batches", "detections_to_host", "gather_to_rank_zero"]

#: validation detections on the host: ``image_ids [M]`` int64, ``image_sizes [M,2]`` (height, width) int64,
#: ``counts [M]`` int64 (detections per image) and ``packed [K,6]`` float32 (``l, t, r, b, score, label``
#: per detection, images in order)
HostDetections = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def detections_to_host(detections: Sequence[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's ``boxes [K,4]``, ``scores [K]``, ``labels [K]`` per dict (any device) -> ``packed [sum K,
    6]`` float32 (``l, t, r, b, score, label``) and ``counts [N]`` on the host, in one device-to-host copy."""
    counts = torch.tensor([int(d["scores"].numel()) for d in detections], dtype=torch.int64)
    if not detections:
        return torch.zeros((0, 6)), counts
    rows = [
        torch.cat(
            [d["boxes"].float().reshape(-1, 4), d["scores"].float()[:, None], d["labels"].float()[:, None]], 1
        )
        for d in detections
    ]
    return torch.cat(rows).to("cpu"), counts


def concat_batches(batches: Sequence[HostDetections]) -> HostDetections:
    """This rank's validation batches as one :data:`HostDetections` (the ids and sizes may still be on the
    device: one copy each for the whole validation)."""
    if not batches:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.reshape(0, 2), empty, torch.zeros((0, 6))
    return tuple(
        torch.cat([b[i] for b in batches]).to("cpu", torch.int64 if i < 3 else torch.float32)
        for i in range(4)
    )  # type: ignore[return-value]


def gather_to_rank_zero(part: HostDetections) -> list[HostDetections]:
    """Every rank's :data:`HostDetections` on global rank 0 (rank order), one message per rank; other ranks
    get an empty list."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [part]
    rank_zero = dist.get_rank() == 0
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank_zero else None
    dist.gather_object(part, gathered, dst=0)
    return list(gathered) if gathered is not None else []


def coco_rows(part: HostDetections, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO result rows of :data:`HostDetections` (labels without a dataset id, from a head wider than the
    data set, dropped)."""
    image_ids, image_sizes, counts, packed = part
    packed = packed.double()
    detections = []
    for rows in packed.split(counts.tolist()):
        rows = rows[rows[:, 5] <= len(category_ids)]
        detections.append({"boxes": rows[:, :4], "scores": rows[:, 4], "labels": rows[:, 5].long()})
    return detections_to_coco(image_ids, image_sizes, detections, list(category_ids))
