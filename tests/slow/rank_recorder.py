"""A test-only Lightning callback that writes what one rank saw to ``<out_dir>/rank<global rank>.json``.

Injected into ``train.py`` runs of the slow tests with Hydra overrides (``tests/slow`` on ``PYTHONPATH``)::

    +callbacks.rank_recorder._target_=rank_recorder.RankRecorder +callbacks.rank_recorder.out_dir=DIR

Recorded: the rank, world size, node rank, cluster environment and strategy Lightning chose, the learning
rate after scaling to the global batch, the image ids of every training batch (needs
``+data.train_image_ids=true``) and a SHA-256 of the final network weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the keys and the exact bytes of the tensors of ``state_dict`` (sorted by key)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key].detach().cpu().contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RankRecorder(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"batches": []}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.record.update(
            global_rank=trainer.global_rank,
            world_size=trainer.world_size,
            node_rank=trainer.node_rank,
            local_rank=trainer.local_rank,
            num_nodes=trainer.num_nodes,
            cluster_environment=type(trainer.strategy.cluster_environment).__name__,
            strategy=type(trainer.strategy).__name__,
        )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        ids = batch.get("image_ids") if isinstance(batch, dict) else None
        ids = [] if ids is None else [int(i) for i in ids.reshape(-1).tolist()]
        self.record["batches"].append({"epoch": trainer.current_epoch, "image_ids": ids})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.record.update(
            base_lr=getattr(pl_module, "base_lr", None),
            global_batch_size=pl_module.global_batch_size(),
            global_step=trainer.global_step,
            weights_sha256=weights_digest(pl_module.model.state_dict()),
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record, indent=1))
