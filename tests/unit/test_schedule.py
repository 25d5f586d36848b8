"""Schedules as fractions of the run: the arithmetic behind trainer.max_steps budgets (hand-computed)."""

from __future__ import annotations

import pytest
import torch

from ssd_lightning.errors import ConfigError
from ssd_lightning.training.schedule import (
    RunLength,
    WarmupMultiStepLR,
    milestone_values,
    resolve_schedule,
    run_length,
)


def test_a_step_budget_is_the_same_steps_on_any_folder():
    # 240 images / batch 16 = 15 batches per epoch: 320 steps = 21.33 epochs
    small = run_length(max_epochs=-1, max_steps=320, batches_per_epoch=15)
    assert small == RunLength(320, 15, 15, "steps")
    assert small.describe() == "320 optimizer steps = 21.3 epochs of 15 batches"
    # the built-in 512 images: 32 batches, 10 epochs; a larger folder (64 batches): 5 epochs
    assert run_length(-1, 320, 32).describe() == "320 optimizer steps = 10.0 epochs of 32 batches"
    assert run_length(-1, 320, 64).epochs == 5.0
    # accumulation: ceil(15 / 2) = 8 optimizer steps per epoch, 40 epochs
    accumulated = run_length(-1, 320, 15, accumulate=2)
    assert accumulated.steps_per_epoch == 8 and accumulated.epochs == 40.0
    assert accumulated.describe() == "320 optimizer steps = 40.0 epochs of 15 batches (8 optimizer steps)"


def test_the_first_limit_reached_ends_the_run():
    assert run_length(65, -1, 100) == RunLength(6500, 100, 100, "epochs")
    assert run_length(10, 320, 15) == RunLength(150, 15, 15, "epochs")  # 10 epochs of 15 < 320 steps
    assert run_length(30, 320, 15) == RunLength(320, 15, 15, "steps")
    assert run_length(-1, -1, 15) is None and run_length(None, None, 15) is None


def test_fractions_of_a_step_budget_become_steps():
    schedule = resolve_schedule(0.15, [0.8], run_length(-1, 320, 15))
    # round(0.15 x 320) = 48 warmup steps, decay from step round(0.8 x 320) = 256
    assert (schedule.warmup_steps, schedule.epoch_milestones, schedule.step_milestones) == (48, (), (256,))
    assert schedule.describe(0.1) == "warmup 48 steps; x0.1 at steps [256]"
    shorter = resolve_schedule(0.15, [0.66, 0.83], run_length(-1, 100, 15))
    assert (shorter.warmup_steps, shorter.step_milestones) == (15, (66, 83))


def test_fractions_of_an_epoch_budget_become_epochs():
    # NVIDIA's 43 and 54 of 65 epochs as fractions: round(0.66 x 65 = 42.9), round(0.83 x 65 = 53.95)
    nvidia = resolve_schedule(300, [0.66, 0.83], run_length(65, -1, 1832))
    assert (nvidia.warmup_steps, nvidia.epoch_milestones, nvidia.step_milestones) == (300, (43, 54), ())
    # a 20-epoch sweep keeps the shape: epochs round(13.2) = 13 and round(16.6) = 17
    assert resolve_schedule(0, [0.66, 0.83], run_length(20, -1, 10)).epoch_milestones == (13, 17)
    # whole numbers stay epochs, whatever the budget
    assert resolve_schedule(50, [8], run_length(-1, 320, 32)).epoch_milestones == (8,)


def test_wrong_schedules_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"optim.milestones=\[0.5, 8\] mixes epochs and fractions"):
        milestone_values([8, 0.5])
    with pytest.raises(ConfigError, match="optim.milestones=2.5: give a whole number"):
        milestone_values([2.5])
    with pytest.raises(ConfigError, match="optim.warmup_steps=-1"):
        resolve_schedule(-1, [], None)
    with pytest.raises(ConfigError, match="the run has no end: set trainer.max_steps or trainer.max_epochs"):
        resolve_schedule(0.1, [43], None)


def test_the_scheduler_decays_at_steps_and_epochs():
    params = [torch.nn.Parameter(torch.zeros(1))]
    sgd = torch.optim.SGD(params, lr=1.0)
    scheduler = WarmupMultiStepLR(sgd, warmup_steps=2, milestones=[1], gamma=0.1, step_milestones=[3])
    assert [scheduler.factor(s, 0) for s in range(5)] == pytest.approx([0.5, 1, 1, 0.1, 0.1])
    assert scheduler.factor(4, 1) == pytest.approx(0.01)  # both decays
    # a resumed scheduler keeps its position from the checkpoint and its schedule from the config
    for _ in range(3):
        sgd.step()
        scheduler.step()
    state = scheduler.state_dict()
    longer = WarmupMultiStepLR(torch.optim.SGD(params, lr=1.0), 2, [1], 0.1, step_milestones=[6])
    longer.load_state_dict(state)
    assert longer.last_epoch == 3 and longer.step_milestones == [6]


def test_the_quickstart_budget_is_the_former_10_epoch_schedule_on_the_built_in_set():
    # built-in set: 486 annotated images // 16 = 30 batches; formerly 10 epochs, warmup 50, x0.1 at epoch 8
    schedule = resolve_schedule(0.1667, [0.8], run_length(-1, 300, 30))
    assert (schedule.warmup_steps, schedule.step_milestones) == (50, (240,))
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    now = WarmupMultiStepLR(sgd, schedule.warmup_steps, (), 0.1, step_milestones=schedule.step_milestones)
    before = WarmupMultiStepLR(sgd, 50, [8], 0.1)
    assert [now.factor(s, s // 30) for s in range(300)] == [before.factor(s, s // 30) for s in range(300)]
