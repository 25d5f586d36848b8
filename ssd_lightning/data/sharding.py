"""Which samples, seeds and device each rank's pipelines use: shard math, per-epoch permutations, placement.

Pure functions of (seed, epoch, rank, world size), so that every rank computes the same global order without
talking to the others and a resumed run repeats the data of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ssd_lightning.errors import DataError

__all__ = ["augmentation_seed", "epoch_permutation", "resolve_runtime", "shard_range", "shard_size"]


def shard_size(num_samples: int, shard_id: int, num_shards: int) -> int:
    """Samples in DALI's shard ``shard_id`` of ``num_shards`` (contiguous, sizes differ by at most one)."""
    return (num_samples * (shard_id + 1)) // num_shards - (num_samples * shard_id) // num_shards


def shard_range(num_samples: int, shard_id: int, num_shards: int) -> range:
    return range((num_samples * shard_id) // num_shards, (num_samples * (shard_id + 1)) // num_shards)


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The global training order of epoch ``epoch`` (a permutation of ``range(num_samples)``, the same on
    every rank and in every run with this ``seed``)."""
    return np.random.default_rng([int(seed) % 2**63, int(epoch)]).permutation(num_samples)


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """The DALI seed of rank ``rank``'s training pipeline in epoch ``epoch`` (independent draws per rank)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(rank)]).generate_state(1)
    return int(state[0]) % 2**31


def resolve_runtime(
    trainer: Any,
    rank: int,
    num_shards: int | None,
    device: str,
    device_id: int | None,
    precision: str | int | None,
) -> dict[str, Any]:
    """Where and how this process's pipelines run: ``{"rank", "world", "decode", "device_id", "dtype",
    "cast"}``.

    ``trainer`` (or None) gives the world size, the rank's CUDA device and the precision unless given
    explicitly; ``device`` is ``data.device`` (``auto``: the trainer's accelerator, else CUDA when visible).
    ``decode`` is ``mixed`` on a GPU, else ``cpu``; ``dtype`` the DALI output type and ``cast`` a torch dtype
    to convert to after DALI (bf16, which DALI does not emit), or None.
    """
    world = int(num_shards) if num_shards is not None else (trainer.world_size if trainer else 1)
    if not 0 <= rank < world:
        raise ValueError(f"shard_id {rank} is not in 0..{world - 1}")
    local_rank = int(trainer.local_rank) if trainer is not None else 0
    trainer_device = trainer.strategy.root_device if trainer is not None else None
    if device == "auto":
        use_gpu = trainer_device.type == "cuda" if trainer_device is not None else torch.cuda.is_available()
    elif device in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise DataError("data.device=gpu but no CUDA device is visible; set data.device=auto or cpu")
        use_gpu = True
    else:
        use_gpu = False
    chosen = None
    if use_gpu:
        if device_id is not None:
            chosen = int(device_id)
        elif (
            trainer_device is not None and trainer_device.type == "cuda" and trainer_device.index is not None
        ):
            chosen = trainer_device.index
        else:
            chosen = local_rank
    precision = str(precision if precision is not None else getattr(trainer, "precision", "32"))
    if precision.startswith("bf16"):
        dali_dtype, cast = "float32", torch.bfloat16
    elif precision.startswith("16") or precision == "half":
        dali_dtype, cast = "float16", None
    else:
        dali_dtype, cast = "float32", None
    return {
        "rank": rank,
        "world": world,
        "decode": "mixed" if use_gpu else "cpu",
        "device_id": chosen,
        "dtype": dali_dtype,
        "cast": cast,
    }
