"""The optimiser recipe through Lightning's real loop: lr scaling, warmup, milestones, weight-decay groups,
resume of the schedule, and checkpoints readable with torch.load(weights_only=True).

The data here is a plain DataLoader of fixed tensors (the schedule does not depend on the data); the DALI path
is covered by test_train_evaluate.py.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ssd_lightning.boxes import ssd300_default_boxes
from ssd_lightning.training.module import SSDModule
from ssd_lightning.training.schedule import WarmupMultiStepLR, param_groups, scaled_lr


class _Boxes(Dataset):
    """Images with a few positive anchors (targets = the anchors themselves, as box_encoder gives)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.anchors = ssd300_default_boxes().xywh

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        labels = torch.zeros(8732, dtype=torch.int64)
        labels[torch.randint(0, 8732, (8,), generator=g)] = 1
        return {
            "images": torch.randn(3, 300, 300, generator=g),
            "boxes": self.anchors.clone(),
            "labels": labels,
        }


class _RecordLR(pl.Callback):
    """(epoch, global_step, lr of every group) at every optimizer step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.seen.append(
            (trainer.current_epoch, trainer.global_step, [g["lr"] for g in optimizer.param_groups])
        )


HP = dict(
    backbone="resnet18",
    num_classes=2,
    lr=0.01,
    reference_batch_size=32,
    batch_size=8,  # no data module: the scaling uses this per-device batch size
    warmup_steps=3,
    milestones=[1, 2],
    gamma=0.1,
)
BATCHES_PER_EPOCH, ACCUMULATE = 4, 2  # 2 optimizer steps per epoch


def _fit(tmp_path, max_epochs: int, ckpt_path=None) -> tuple[_RecordLR, pl.Trainer, SSDModule]:
    pl.seed_everything(0)
    module = SSDModule(**HP)
    record = _RecordLR()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, monitor=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        accumulate_grad_batches=ACCUMULATE,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, ckpt],
    )
    loader = DataLoader(_Boxes(2 * BATCHES_PER_EPOCH), batch_size=2)  # BN needs 2 images at 1x1
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return record, trainer, module


def expected_lr(step: int, epoch: int) -> float:
    base = 0.01 * (8 * 1 * ACCUMULATE) / 32  # lr x global batch / 32 = 0.005
    warm = min(1.0, (step + 1) / 3)
    return base * warm * 0.1 ** sum(m <= epoch for m in (1, 2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    full = _fit(tmp_path_factory.mktemp("full"), max_epochs=3)
    part_dir = tmp_path_factory.mktemp("part")
    _fit(part_dir, max_epochs=2)
    resumed = _fit(tmp_path_factory.mktemp("resumed"), max_epochs=3, ckpt_path=str(part_dir / "last.ckpt"))
    return full, resumed, part_dir / "last.ckpt"


def test_lr_scaling_warmup_and_milestones(runs):
    (record, trainer, _), _, _ = runs
    hand = [  # (epoch, step, lr): 0.005 x warmup (1/3, 2/3, 1) x 0.1 from epoch 1, 0.01 from epoch 2
        (0, 0, 0.005 / 3),
        (0, 1, 0.005 * 2 / 3),
        (1, 2, 0.0005),
        (1, 3, 0.0005),
        (2, 4, 0.00005),
        (2, 5, 0.00005),
    ]
    assert [(e, s) for e, s, _ in record.seen] == [(e, s) for e, s, _ in hand]
    for (_, _, lrs), (e, s, lr) in zip(record.seen, hand, strict=True):
        assert lr == pytest.approx(expected_lr(s, e), rel=1e-12)
        assert lrs == pytest.approx([lr, lr], rel=1e-9), (e, s)
    assert trainer.global_step == 6


def test_scaled_lr_formula():
    # NVIDIA: 2.6e-3 x 8 GPUs x (64 / 32) = 0.0416; A100 8 x 128 at 2.7e-3: 0.0864
    assert scaled_lr(2.6e-3, 64 * 8) == pytest.approx(0.0416)
    assert scaled_lr(2.7e-3, 128 * 8) == pytest.approx(0.0864)
    assert scaled_lr(0.02, 16) == pytest.approx(0.01)


def test_weight_decay_only_on_conv_weights(runs):
    (_, trainer, module), _, _ = runs
    optimizer = trainer.optimizers[0]
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(module.model.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}  # every parameter is optimised, once
    for name, p in names.items():
        is_bn = any(
            name.startswith(m + ".")
            for m, mod in module.model.named_modules()
            if isinstance(mod, torch.nn.BatchNorm2d)
        )
        if p.ndim == 1 or name.endswith(".bias") or is_bn:
            assert decay_of[id(p)] == 0.0, name
        else:
            assert p.ndim == 4, name  # only convolutions have multi-dimensional weights in SSD300
            assert decay_of[id(p)] == 5e-4, name
    groups = param_groups(module.model, 5e-4)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]


def test_resume_continues_step_count_and_schedule(runs):
    (full, full_trainer, full_module), (resumed, resumed_trainer, resumed_module), _ = runs
    # the resumed run only runs epoch 2, with the steps and rates the uninterrupted run had there
    assert [(e, s) for e, s, _ in resumed.seen] == [(2, 4), (2, 5)]
    resumed_lrs = [lr for _, _, lrs in resumed.seen for lr in lrs]
    assert resumed_lrs == pytest.approx([lr for e, _, lrs in full.seen if e == 2 for lr in lrs], rel=1e-12)
    assert resumed_trainer.global_step == full_trainer.global_step == 6
    sched = resumed_trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, WarmupMultiStepLR) and sched.last_epoch == 6 and sched.epoch == 2
    # same data, same seed, same schedule, restored optimizer momentum: the same weights
    for (name, a), b in zip(
        full_module.state_dict().items(), resumed_module.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_checkpoint_loads_with_weights_only(runs):
    _, _, path = runs
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["backbone"] == "resnet18" and hp["num_classes"] == 2
    assert {
        "category_ids",
        "class_names",
        "lr",
        "warmup_steps",
        "milestones",
        "gamma",
        "weight_decay",
    } <= set(hp)
    assert all(isinstance(v, (int, float, str, bool, list, type(None))) for v in hp.values())
    assert all(k.startswith(("model.", "loss.")) for k in ckpt["state_dict"])
    assert "model.conf.0.weight" in ckpt["state_dict"]
    sched = ckpt["lr_schedulers"][0]
    assert sched["last_epoch"] == 4 and sched["epoch"] == 1 and sched["milestones"] == [1, 2]


def test_warmup_factor_edges():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupMultiStepLR(opt, warmup_steps=0, milestones=[43, 54], gamma=0.1)
    assert s.factor(0, 0) == 1.0 and s.factor(10**6, 42) == 1.0
    assert math.isclose(s.factor(0, 43), 0.1) and math.isclose(s.factor(0, 54), 0.01)
    s = WarmupMultiStepLR(opt, warmup_steps=300)
    assert math.isclose(s.factor(0, 0), 1 / 300) and s.factor(299, 0) == 1.0 and s.factor(300, 0) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupMultiStepLR(opt, warmup_steps=-1)
