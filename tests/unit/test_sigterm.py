"""The SIGTERM agreement under DDP (training/sigterm.py): one stop point for every rank, no blocking read."""

from __future__ import annotations

import multiprocessing
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssd_lightning.training.fastpath import HostSyncCounter
from ssd_lightning.training.sigterm import AgreedSigtermConnector, AgreedSigtermEpochLoop, use_agreed_sigterm


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (what the agreement reduces over)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _trainer(devices: int = 1, max_steps: int = 7) -> pl.Trainer:
    strategy = "ddp" if devices > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        max_steps=max_steps,
        min_steps=3,
        enable_progress_bar=False,
    )
    use_agreed_sigterm(trainer)
    return trainer


def test_the_loop_keeps_lightnings_step_limits_and_validation_loop():
    trainer = _trainer()
    loop = trainer.fit_loop.epoch_loop
    assert type(loop) is AgreedSigtermEpochLoop
    assert type(trainer._signal_connector) is AgreedSigtermConnector
    assert (loop.min_steps, loop.max_steps, trainer.max_steps, trainer.min_steps) == (3, 7, 7, 3)
    assert trainer.validate_loop is not loop.val_loop and loop.val_loop.trainer is trainer


def _sigterm(trainer: pl.Trainer, stage: TrainerFn) -> None:
    trainer.state.fn = stage
    trainer._signal_connector._sigterm_notifier_fn(signal.SIGTERM, None)


def test_a_multi_process_fit_leaves_the_sigterm_to_the_agreement():
    """Lightning's own flag stays down (its per-rank checks cannot stop one rank alone); the request is
    kept."""
    trainer = _trainer(devices=2)
    _sigterm(trainer, TrainerFn.FITTING)
    assert trainer._signal_connector.requested and not trainer.received_sigterm


@pytest.mark.parametrize(
    "devices, stage", [(1, TrainerFn.FITTING), (2, TrainerFn.VALIDATING), (2, TrainerFn.PREDICTING)]
)
def test_one_process_and_evaluation_stop_on_their_own_flag_as_in_lightning(devices, stage):
    trainer = _trainer(devices=devices)
    _sigterm(trainer, stage)
    assert trainer.received_sigterm


def test_a_request_stops_the_batch_after_the_one_it_was_reduced_before(process_group):
    trainer = _trainer()
    loop = trainer.fit_loop.epoch_loop
    for _ in range(3):
        loop._broadcast_sigterm_tensor()  # no SIGTERM: batches go on
    trainer._signal_connector.requested = True
    loop._broadcast_sigterm_tensor()  # reduced now, read before the next batch
    assert not trainer.received_sigterm
    with pytest.raises(SIGTERMException):
        loop._broadcast_sigterm_tensor()
    assert trainer.received_sigterm  # Lightning's later checks and the preemption checkpoint see it


def test_the_agreement_makes_no_blocking_read_where_lightnings_makes_one(process_group):
    ours = _trainer().fit_loop.epoch_loop
    lightning = _TrainingEpochLoop(ours.trainer)
    with HostSyncCounter() as counted_ours:
        for _ in range(4):
            ours._broadcast_sigterm_tensor()
    with HostSyncCounter() as counted_lightning:
        for _ in range(4):
            lightning._broadcast_sigterm_tensor()
    assert counted_ours.blocking == 0, counted_ours.counts
    assert counted_lightning.blocking == 4, counted_lightning.counts


def _rank(rank: int, store: str, signalled_rank: int, signal_before: int, out: multiprocessing.Queue) -> None:
    """Run 8 batches' agreements on one rank of 2; the SIGTERM reaches ``signalled_rank`` only, before batch
    ``signal_before``. Puts (rank, the batch before which it stopped, Lightning's flag then)."""
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        trainer = _trainer(devices=2)
        trainer.state.fn = TrainerFn.FITTING
        loop = trainer.fit_loop.epoch_loop
        for batch in range(8):
            if rank == signalled_rank and batch == signal_before:
                trainer._signal_connector._sigterm_notifier_fn(signal.SIGTERM, None)
            assert not trainer.received_sigterm  # no rank may stop on its own before the agreement
            try:
                loop._broadcast_sigterm_tensor()
            except SIGTERMException:
                out.put((rank, batch, trainer.received_sigterm))
                return
        out.put((rank, None, trainer.received_sigterm))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_two_ranks_stop_before_the_same_batch_whichever_rank_got_the_signal(tmp_path: Path, signalled_rank):
    fork = multiprocessing.get_context("fork")  # no re-import: the ranks are up in milliseconds
    out = fork.Queue()
    store = str(tmp_path / "store")
    ranks = [fork.Process(target=_rank, args=(r, store, signalled_rank, 3, out)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]
    results = sorted(out.get(timeout=5) for _ in ranks)
    # signalled before batch 3: reduced before batch 3, read before batch 4; both ranks stop there
    assert results == [(0, 4, True), (1, 4, True)]
