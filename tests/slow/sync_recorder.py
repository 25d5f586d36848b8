"""A test-only Lightning callback that counts host synchronisations per training-loop iteration and writes
them to ``<out_dir>/syncs_rank<global rank>.json``.

Injected into ``train.py`` runs with Hydra overrides (``tests/slow`` on ``PYTHONPATH``)::

    +callbacks.sync_recorder._target_=sync_recorder.SyncRecorder +callbacks.sync_recorder.out_dir=DIR

One record per iteration from the end of one training batch to the end of the next (the data fetch, the
step, every callback and Lightning's bookkeeping), counted by
:class:`~ssd_lightning.training.fastpath.HostSyncCounter` with CPU reads included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ssd_lightning.training.fastpath import HostSyncCounter


class SyncRecorder(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.steps: list[dict[str, Any]] = []
        self._counter: HostSyncCounter | None = None

    def _close(self, trainer: pl.Trainer) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            c = self._counter
            self.steps.append(
                {"step": trainer.global_step, "blocking": c.blocking, "project": c.project, "where": c.where}
            )
            self._counter = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int):
        self._close(trainer)
        self._counter = HostSyncCounter(trace=True, host_reads=True)
        self._counter.__enter__()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._counter_stop()

    def _counter_stop(self) -> None:
        if self._counter is not None:  # an epoch's end is not a steady-state step
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._counter_stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"syncs_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"world_size": trainer.world_size, "steps": self.steps}, indent=1))
