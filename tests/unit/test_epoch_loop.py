"""LaggedSigtermEpochLoop: the DDP SIGTERM agreement with no blocking read, a batch after Lightning's."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssd_lightning.training.epoch_loop import LaggedSigtermEpochLoop, use_lagged_sigterm_loop
from ssd_lightning.training.fastpath import HostSyncCounter


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (what ``_broadcast_sigterm_tensor`` broadcasts over)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _trainer(max_steps: int = 7) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        max_steps=max_steps,
        min_steps=3,
        enable_progress_bar=False,
    )
    use_lagged_sigterm_loop(trainer)
    return trainer


def test_the_loop_keeps_lightnings_step_limits_and_validation_loop():
    trainer = _trainer()
    loop = trainer.fit_loop.epoch_loop
    assert type(loop) is LaggedSigtermEpochLoop
    assert (loop.min_steps, loop.max_steps, trainer.max_steps, trainer.min_steps) == (3, 7, 7, 3)
    assert trainer.validate_loop is not loop.val_loop and loop.val_loop.trainer is trainer


def test_a_sigterm_stops_the_batch_after_the_one_it_was_broadcast_before(process_group):
    trainer = _trainer()
    loop = trainer.fit_loop.epoch_loop
    for _ in range(3):
        loop._broadcast_sigterm_tensor()  # no SIGTERM: batches go on
    trainer._signal_connector.received_sigterm = True
    loop._broadcast_sigterm_tensor()  # broadcast now, read before the next batch
    with pytest.raises(SIGTERMException):
        loop._broadcast_sigterm_tensor()


def test_the_agreement_makes_no_blocking_read_where_lightnings_makes_one(process_group):
    lagged = _trainer().fit_loop.epoch_loop
    lightning = _TrainingEpochLoop(lagged.trainer)
    with HostSyncCounter() as ours:
        for _ in range(4):
            lagged._broadcast_sigterm_tensor()
    with HostSyncCounter() as theirs:
        for _ in range(4):
            lightning._broadcast_sigterm_tensor()
    assert ours.blocking == 0, ours.counts
    assert theirs.blocking == 4, theirs.counts
