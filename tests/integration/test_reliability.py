"""Fault tolerance through the real stack (Hydra config, DALI CPU pipeline, Lightning loop): exact resume from
epoch-end and preemption checkpoints, SIGTERM during validation, the non-finite loss guard, atomic checkpoint
files and ``ckpt_path=last``. Kill -9 and signals from outside the process: tests/slow/test_preemption.py."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ssd_lightning.checkpoints import AtomicCheckpointIO
from ssd_lightning.checkpoints.io import find_last_checkpoint, resolve_ckpt_path
from ssd_lightning.errors import ConfigError, NonFiniteLossError, WriteError
from ssd_lightning.runtime.builders import build_module, instantiate_callbacks
from ssd_lightning.runtime.entry import run_task
from ssd_lightning.tasks.train import train
from ssd_lightning.training.callbacks import PREEMPTED_EXIT_CODE, NonFiniteGuard
from ssd_lightning.training.checkpointing import LinkedCheckpoint
from ssd_lightning.training.clipping import FusedKernelClipping
from ssd_lightning.training.fastpath import FastPathCallback

from .hydra_helpers import TINY, compose_config

# 2 of the 3 batches of 4 (15 annotated train images) per epoch: shorter runs, same mechanics
STEPS_PER_EPOCH = 2
BASE = [*TINY, "seed=0", "logger=[]", f"+trainer.limit_train_batches={STEPS_PER_EPOCH}"]


class _Sigterm(pl.Callback):
    """Sends this process a real SIGTERM after training batch ``batch`` of ``epoch`` (or validation batch
    ``val_batch``): Lightning's handler, installed by fit, turns it into a stop at the step boundary."""

    def __init__(self, epoch: int | None = None, batch: int | None = None, val_batch: int | None = None):
        self.epoch, self.batch, self.val_batch = epoch, batch, val_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.val_batch and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


class _CopyLastAtEpochStart(pl.Callback):
    """Keeps a copy of checkpoints/last.ckpt as it is when ``epoch`` starts (the previous epoch's end)."""

    def __init__(self, epoch: int, dst: Path):
        self.epoch, self.dst = epoch, dst

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            shutil.copy(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt", self.dst)


class _NaNImages(pl.Callback):
    """Turns the images of the listed (epoch, batch) into NaN before the step (a corrupt batch)."""

    def __init__(self, where: set[tuple[int, int]]):
        self.where = where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) in self.where:
            batch["images"].fill_(float("nan"))


def _train(run_dir: Path, overrides: list[str], callbacks: list[pl.Callback] = ()) -> dict | int:
    """train on the tiny recipe with extra callbacks; the objects built, or the exit code."""
    cfg = compose_config("train", [*BASE, *overrides], run_dir)
    with pytest.MonkeyPatch.context() as mp:
        build = instantiate_callbacks
        mp.setattr(
            "ssd_lightning.tasks.train.instantiate_callbacks",
            lambda c, have_logger: build(c, have_logger) + list(callbacks),
        )
        try:
            _, objects = train(cfg)
        except SystemExit as stop:
            return stop.code
    return objects


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: these runs are several trainings in a row, and a busy 2-core machine makes two
    threads several times slower (results are exact for any fixed thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(objects: dict) -> dict[str, torch.Tensor]:
    return objects["model"].state_dict()


@pytest.fixture(scope="module")
def chain(synthetic_coco, tmp_path_factory, one_thread):
    """A: 2 epochs uninterrupted. B: SIGTERM after batch 0 of epoch 1 (keeping epoch 0's last.ckpt aside).
    C1: resumes B, gets a SIGTERM during the final validation; C1b resumes that. C2: resumes epoch 0's
    checkpoint."""
    root = [f"data.root={synthetic_coco}"]
    base = tmp_path_factory.mktemp("chain")
    runs = {"A": _train(base / "A", root)}
    epoch0 = base / "epoch0.ckpt"
    runs["B"] = _train(base / "B", root, [_Sigterm(epoch=1, batch=0), _CopyLastAtEpochStart(1, epoch0)])
    preempted = base / "B" / "checkpoints" / "last.ckpt"
    runs["B_ckpt"] = torch.load(preempted, map_location="cpu", weights_only=True)
    runs["C1"] = _train(base / "C1", [*root, f"ckpt_path={preempted}"], [_Sigterm(val_batch=1)])
    during_val = base / "C1" / "checkpoints" / "last.ckpt"
    runs["C1b"] = _train(base / "C1b", [*root, f"ckpt_path={during_val}"])
    runs["C2"] = _train(base / "C2", [*root, f"ckpt_path={epoch0}"])
    return runs


def test_sigterm_writes_the_checkpoint_at_the_step_boundary_and_exits_143(chain):
    assert chain["B"] == PREEMPTED_EXIT_CODE == 143
    ckpt = chain["B_ckpt"]  # loads with weights_only=True
    assert ckpt["global_step"] == STEPS_PER_EPOCH + 1 and ckpt["epoch"] == 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    assert "RNGState" in ckpt["callbacks"] and "torch" in ckpt["callbacks"]["RNGState"]


def _assert_same_run(a: dict, b: dict) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ta, tb = a["trainer"], b["trainer"]
    assert ta.global_step == tb.global_step == 2 * STEPS_PER_EPOCH
    assert ta.current_epoch == tb.current_epoch == 2
    assert [g["lr"] for g in ta.optimizers[0].param_groups] == [
        g["lr"] for g in tb.optimizers[0].param_groups
    ]
    sa, sb = ta.optimizers[0].state_dict()["state"], tb.optimizers[0].state_dict()["state"]
    for key in sa:  # SGD momentum
        assert torch.equal(sa[key]["momentum_buffer"], sb[key]["momentum_buffer"]), key


def test_resume_from_an_epoch_end_checkpoint_is_exact(chain):
    _assert_same_run(chain["A"], chain["C2"])
    trained = chain["B_ckpt"]["state_dict"]  # one step after epoch 0: the runs did train
    assert any(not torch.equal(v, trained[k]) for k, v in chain["A"]["model"].state_dict().items())


def test_resume_after_a_mid_epoch_sigterm_is_exact(chain):
    assert chain["C1"] == PREEMPTED_EXIT_CODE
    _assert_same_run(chain["A"], chain["C1b"])


def test_a_validation_interrupted_by_sigterm_runs_again_in_full(chain):
    a, resumed = chain["A"]["model"], chain["C1b"]["model"]
    assert resumed.val_metrics == a.val_metrics and a.val_metrics is not None
    assert resumed.val_detections == a.val_detections  # every image, once
    assert chain["C1b"]["trainer"].checkpoint_callbacks[0] is not None


def test_non_finite_loss_is_skipped_then_stops_training_with_the_good_model(
    synthetic_coco, tmp_path, capsys, caplog, one_thread
):
    """Epoch 0: batch 0 is NaN (skipped, training goes on), then validation writes best.ckpt. Epoch 1:
    batches 0 and 1 are NaN: with max_bad_steps=2 training stops before writing anything."""
    run = tmp_path / "run"
    overrides = [
        f"data.root={synthetic_coco}",
        "callbacks.non_finite.max_bad_steps=2",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.validation_schedule.epochs=null",  # every epoch (the quickstart validates after the last)
        "trainer.max_epochs=3",
    ]
    nan = _NaNImages({(0, 0), (1, 0), (1, 1)})
    cfg = compose_config("train", [*BASE, *overrides], run)
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, logger="ssd_lightning"):
        build = instantiate_callbacks
        mp.setattr(
            "ssd_lightning.tasks.train.instantiate_callbacks",
            lambda c, have_logger: build(c, have_logger) + [nan],
        )
        model = {}
        mp.setattr(
            "ssd_lightning.tasks.train.build_module",
            lambda *a, _b=build_module: model.setdefault("m", _b(*a)),
        )
        with pytest.raises(SystemExit) as stop:
            run_task(train, cfg)
    assert stop.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("error: training stopped: non-finite loss in 2 optimizer steps in a row")
    assert "step 3 (epoch 1, batch 1)" in err[-1] and "max_bad_steps" in err[-1]
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("non-finite loss at")]
    assert [r.split(":")[0] for r in reports] == [
        "non-finite loss at step 0 (epoch 0, batch 0)",
        "non-finite loss at step 2 (epoch 1, batch 0)",
        "non-finite loss at step 3 (epoch 1, batch 1)",
    ]
    ckpts = run / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == best["epoch"] == 0 and last["global_step"] == STEPS_PER_EPOCH
    # the skipped steps changed nothing: the model in memory is the last good one, BatchNorm statistics too
    state = model["m"].state_dict()
    for key, value in last["state_dict"].items():
        assert torch.equal(state[key], value), key
        assert not value.is_floating_point() or bool(torch.isfinite(value).all()), key


def test_a_new_best_epoch_writes_one_file_for_best_and_last(chain):
    # run A validates once, after its last epoch: best.ckpt, then last.ckpt of the same epoch end -> one file
    checkpoints = Path(chain["A"]["trainer"].default_root_dir) / "checkpoints"
    best, last = checkpoints / "best.ckpt", checkpoints / "last.ckpt"
    assert best.stat().st_ino == last.stat().st_ino and best.stat().st_nlink == 2
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 * STEPS_PER_EPOCH
    for key, value in _weights(chain["A"]).items():
        assert torch.equal(saved["state_dict"][key], value), key
    # what a resume reads: the best score of this epoch's validation is in last.ckpt
    best_state = next(v for k, v in saved["callbacks"].items() if "val/AP" in k)
    assert float(best_state["best_model_score"]) == pytest.approx(
        chain["A"]["model"].val_metrics["AP"], rel=1e-6
    )
    # replacing last.ckpt (atomically: a new file renamed over it) leaves best.ckpt's file as it was
    AtomicCheckpointIO().save_checkpoint({"step": -1}, last)
    assert best.stat().st_nlink == 1 and torch.load(best, weights_only=True)["global_step"] == 4
    # the callback state keeps ModelCheckpoint's key: checkpoints written before LinkedCheckpoint restore it
    plain = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/AP", mode="max")
    ours = LinkedCheckpoint(dirpath=checkpoints, filename="best", monitor="val/AP", mode="max")
    assert ours.state_key == plain.state_key


def test_a_failed_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(WriteError) as failed:
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    # one line: what, where, how much (3 float32 = 12 B), and that nothing was lost
    assert str(failed.value).startswith(f"no space left on device while writing {path} (12 B needed, ")
    assert str(failed.value).endswith(f" free); the previous checkpoint {path} is intact")
    assert failed.value.errno == 28 and "\n" not in str(failed.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, complete
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no .tmp left behind
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_ckpt_path_last_finds_the_newest_last_checkpoint(tmp_path, monkeypatch, caplog):
    runs = tmp_path / "outputs" / "train" / "runs"
    older, newer = runs / "2024-01-01_00-00-00", runs / "2024-01-02_00-00-00"
    for i, run in enumerate((newer, older)):  # the newer run's file is written first: mtime decides
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        os.utime(run / "checkpoints" / "last.ckpt", (1000 + i, 1000 + i))
    (older / "checkpoints" / "last.ckpt.tmp").write_bytes(b"half")  # a kill during a write: ignored
    current = runs / "2024-01-03_00-00-00"
    assert find_last_checkpoint(current, runs) == older / "checkpoints" / "last.ckpt"
    assert find_last_checkpoint(current, None) is None
    (current / "checkpoints").mkdir(parents=True)  # this run's own checkpoint wins (fixed run dir, requeue)
    (current / "checkpoints" / "last.ckpt").write_bytes(b"x")
    os.utime(current / "checkpoints" / "last.ckpt", (10, 10))
    assert find_last_checkpoint(current, runs) == current / "checkpoints" / "last.ckpt"
    (current / "hpc_ckpt_2.ckpt").write_bytes(b"x")  # SLURM's requeue checkpoint, newer: it wins
    assert find_last_checkpoint(current, runs) == current / "hpc_ckpt_2.ckpt"

    monkeypatch.delenv("SSD_LIGHTNING_RESUME_LAST", raising=False)
    cfg = compose_config("train", ["ckpt_path=last", f"paths.root_dir={tmp_path}"], runs / "new")
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        assert resolve_ckpt_path(cfg) == str(older / "checkpoints" / "last.ckpt")
    assert any("ckpt_path=last: resuming from" in r.getMessage() for r in caplog.records)
    assert os.environ["SSD_LIGHTNING_RESUME_LAST"] == str(older / "checkpoints" / "last.ckpt")  # DDP ranks
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank Lightning started: rank 0's answer, without looking
    assert (
        resolve_ckpt_path(compose_config("train", ["ckpt_path=last"], tmp_path / "y"))
        == os.environ["SSD_LIGHTNING_RESUME_LAST"]
    )
    monkeypatch.delenv("LOCAL_RANK")
    empty = compose_config("train", ["ckpt_path=last", f"paths.root_dir={tmp_path / 'none'}"], tmp_path / "x")
    assert resolve_ckpt_path(empty) is None  # nothing to resume: from scratch (set-and-forget in job scripts)
    monkeypatch.delenv("SSD_LIGHTNING_RESUME_LAST")
    plain = compose_config("train", ["ckpt_path=/some/file.ckpt"], tmp_path / "x")
    assert resolve_ckpt_path(plain) == "/some/file.ckpt"


class _Tiny(pl.LightningModule):
    """loss = sum(linear(x)) * scale + sqrt(z) (z = 0: a finite loss whose gradient is infinite)."""

    def __init__(self, scale: float = 1.0, inf_grad: bool = False):
        super().__init__()
        self.linear, self.bn = torch.nn.Linear(4, 1), torch.nn.BatchNorm1d(4)
        self.z = torch.nn.Parameter(torch.zeros(1), requires_grad=inf_grad)
        self.scale = scale

    def training_step(self, batch, batch_idx):
        loss = self.linear(self.bn(batch[0])).float().sum() * self.scale  # float32: 1e35 is finite
        return loss + torch.sqrt(self.z).sum() if self.z.requires_grad else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit_tiny(module: pl.LightningModule, guard, **trainer_kwargs) -> pl.Trainer:
    from torch.utils.data import DataLoader, TensorDataset

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard],
        **trainer_kwargs,
    )
    data = DataLoader(
        TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0))), batch_size=4
    )
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("skip_on_device", [True, False])
def test_non_finite_gradients_with_a_finite_loss_are_skipped_too(skip_on_device):
    """On the device (the fused kernel's found_inf, BatchNorm put back by torch.where) or after a host read
    (gradients dropped): either way nothing changes, and the stop comes at the third bad step."""
    module = _Tiny(inf_grad=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    guard = NonFiniteGuard(max_bad_steps=3, skip_on_device=skip_on_device)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite gradients \(finite loss\) in 3 optimizer steps"
    ):
        _fit_tiny(module, guard)
    assert guard.on_device is skip_on_device
    for key, value in module.state_dict().items():  # weights, BatchNorm statistics: untouched
        assert torch.equal(value, before[key]), key


def test_a_bad_first_step_skipped_on_the_device_leaves_the_later_steps_exact():
    """A skipped first step (momentum buffers not yet made) and good steps after it: the fused kernel's
    on-device skip gives the weights of the plain SGD loop that never took the bad step, to the last bit or
    so (the reference's
    BatchNorm statistics saw the bad batch: only the weights are compared)."""
    from torch.utils.data import DataLoader, TensorDataset

    class _NaNFirst(_Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 0 else loss

    class _Skip(pl.Callback):  # the reference: no guard, the bad step's update is not taken
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    guarded, reference = _NaNFirst(), _NaNFirst()
    reference.load_state_dict(guarded.state_dict())
    guard = NonFiniteGuard(max_bad_steps=2)
    _fit_tiny(guarded, guard)
    assert guard.on_device and guard.bad_total == 1
    data = TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[_Skip()],
    )  # fmt: skip
    trainer.fit(reference, DataLoader(data, batch_size=4))
    for name, p in guarded.named_parameters():
        # the fused kernel may round the last bit differently from the loop; a step taken would differ by ~0.1
        torch.testing.assert_close(p, dict(reference.named_parameters())[name], rtol=1e-6, atol=1e-7)


def test_amp_loss_scale_overflows_are_normal_and_a_nan_loss_is_not():
    """With a GradScaler, a finite loss whose scaled gradients overflow is AMP's normal skipped step: neither
    reported nor counted. A NaN loss is."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    def amp():
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]

    guard = NonFiniteGuard(max_bad_steps=1)
    trainer = _fit_tiny(_Tiny(scale=1e35), guard, plugins=amp())  # x 65536: overflows float32
    assert trainer.global_step == 4 and guard.bad_total == 0
    assert trainer.precision_plugin.scaler.get_scale() < 65536  # the scaler did skip steps
    with pytest.raises(NonFiniteLossError, match="non-finite loss in 2 optimizer steps"):
        _fit_tiny(_Tiny(scale=float("nan")), NonFiniteGuard(max_bad_steps=2), plugins=amp())


class _TinyClipped(FusedKernelClipping, _Tiny):
    """_Tiny with SSDModule's gradient clipping."""


def _clipped_weights(module: pl.LightningModule, guard: pl.Callback, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module.load_state_dict(_Tiny().state_dict())
    _fit_tiny(module, guard, precision="bf16-mixed", **kwargs)
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_bf16_clipping_with_the_fused_kernel_clips_as_lightning_does():
    """bf16-mixed + gradient_clip_val: Lightning's AMP plugin refuses to clip for the fused kernel that the
    non-finite guard picks (the quickstart crashed at its first step on a GPU); SSDModule's clipping keeps the
    fused kernel (bad steps still skipped on the device) and gives the weights of Lightning's own clipping
    with the default kernel."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _clipped_weights(_Tiny(scale=100.0), NonFiniteGuard(), gradient_clip_val=0.5)
    guard = NonFiniteGuard()
    fused = _clipped_weights(_TinyClipped(scale=100.0), guard, gradient_clip_val=0.5)
    assert guard.on_device  # the fused kernel
    default_kernel = _clipped_weights(_Tiny(scale=100.0), pl.Callback(), gradient_clip_val=0.5)
    unclipped = _clipped_weights(_Tiny(scale=100.0), pl.Callback())
    for name, value in fused.items():
        torch.testing.assert_close(value, default_kernel[name], rtol=1e-5, atol=1e-6)
    assert any((unclipped[n] - v).abs().max() > 0.1 for n, v in fused.items())  # the clip did act


def test_clipping_scaled_gradients_for_an_explicit_fused_kernel_is_one_config_error():
    """16-mixed (a GradScaler) + gradient_clip_val + callbacks.fastpath.optimizer=fused: the fused kernel
    unscales inside its step, after the clip; one line at the fit's start, not Lightning's RuntimeError at
    the first step."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ConfigError, match=r"callbacks\.fastpath\.optimizer=auto"):
        _fit_tiny(_TinyClipped(), FastPathCallback(optimizer="fused"), plugins=[amp], gradient_clip_val=1.0)
