"""A run bounded by trainer.max_steps (the quickstart's budget) through the real stack: the budget line at
start, the schedule's fractions in steps, and a last, partial epoch that still ends with a validation and the
best/last checkpoints."""

from __future__ import annotations

import contextlib
import io
import logging

import torch

from ssd_lightning.tasks.train import train
from ssd_lightning.training.schedule import Schedule, WarmupMultiStepLR, resolve_schedule, run_length

from .hydra_helpers import TINY, compose_config

# 15 annotated train images // batch 4 = 3 batches per epoch: 5 steps end inside epoch 1 (2 of its 3 batches)
BUDGET = ["trainer.max_epochs=-1", "trainer.max_steps=5", "optim.warmup_steps=0.2", "optim.milestones=[0.6]"]


def test_a_step_budget_ends_mid_epoch_with_a_validation_and_checkpoints(synthetic_coco, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = compose_config("train", [*TINY, f"data.root={synthetic_coco}", "seed=0", "logger=[]", *BUDGET], run)
    with (
        caplog.at_level(logging.INFO, logger="ssd_lightning"),
        contextlib.redirect_stdout(io.StringIO()) as out,
    ):
        metrics, objects = train(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert "training budget: 5 optimizer steps = 1.7 epochs of 3 batches (trainer.max_steps)" in messages
    # warmup round(0.2 x 5) = 1 step, decay from step round(0.6 x 5) = 3
    assert any(m.endswith("warmup 1 steps; x0.1 at steps [3]") for m in messages), messages
    trainer = objects["trainer"]
    assert trainer.global_step == 5
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, WarmupMultiStepLR) and scheduler.step_milestones == [3]
    # the partial epoch 1 validated (the COCO table) and wrote best.ckpt and last.ckpt at step 5
    assert "val/AP" in metrics and "COCO evaluation after" in out.getvalue()
    for name in ("best", "last"):
        ckpt = torch.load(run / "checkpoints" / f"{name}.ckpt", map_location="cpu", weights_only=True)
        assert (ckpt["global_step"], ckpt["epoch"]) == (5, 1), name


def test_the_recipes_compose_to_their_schedules(tmp_path):
    def schedule(experiment: str, batches_per_epoch: int, *overrides: str):
        cfg = compose_config("train", [f"experiment={experiment}", *overrides], tmp_path)
        length = run_length(cfg.trainer.max_epochs, cfg.trainer.max_steps, batches_per_epoch)
        return resolve_schedule(cfg.optim.warmup_steps, cfg.optim.milestones, length), length

    # NVIDIA: exactly its epochs 43 and 54 and 300 warmup steps, whatever the epoch's length
    assert schedule("nvidia_v1_1", 1832)[0] == Schedule(300, (43, 54), ())
    # NVIDIA's shape as fractions keeps it on a shorter sweep: epochs 13 and 17 of 20
    short = schedule("nvidia_v1_1", 1832, "trainer.max_epochs=20", "optim.milestones=[0.66,0.83]")[0]
    assert short.epoch_milestones == (13, 17)
    # quickstart: 300 steps on any folder; the built-in set's 30 batches are its former 10 epochs
    built_in, length = schedule("quickstart", 30)
    assert built_in == Schedule(50, (), (240,)) and length.describe() == (
        "300 optimizer steps = 10.0 epochs of 30 batches"
    )
    assert schedule("quickstart", 14)[1].describe() == "300 optimizer steps = 21.4 epochs of 14 batches"
