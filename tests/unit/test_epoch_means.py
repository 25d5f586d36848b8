"""The epoch means of the training losses (torchmetrics MeanMetric): batch-size weighted, non-finite steps
left out, and no host read per step."""

from __future__ import annotations

import math

import pytest
import torch

from ssd_lightning.loss import LossParts
from ssd_lightning.training.fastpath import HostSyncCounter
from ssd_lightning.training.module import SSDModule

STEPS = [  # (total, box, cls, batch size)
    (3.0, 1.0, 2.0, 4),
    (6.0, 2.0, 4.0, 2),
    (math.nan, math.nan, 1.0, 4),  # a non-finite step (NonFiniteGuard skips it): left out of its mean
    (1.5, 0.5, 1.0, 2),
]


@pytest.mark.filterwarnings("ignore:.*self.log.*:UserWarning")  # no Trainer here: self.log does nothing
def test_epoch_means_are_weighted_skip_non_finite_steps_and_never_read_the_device():
    module = SSDModule("resnet18", num_classes=3)
    parts = [LossParts(*(torch.tensor(v) for v in step[:3])) for step in STEPS]
    with HostSyncCounter() as counter:
        for step, part in zip(STEPS, parts, strict=True):
            module._update_epoch_means(part, step[3])
    assert counter.total == 0, counter.counts
    means = {name: float(metric.compute()) for name, metric in module.epoch_means.items()}
    assert means["loss"] == pytest.approx((3 * 4 + 6 * 2 + 1.5 * 2) / 8)
    assert means["loss_box"] == pytest.approx((1 * 4 + 2 * 2 + 0.5 * 2) / 8)
    assert means["loss_cls"] == pytest.approx((2 * 4 + 4 * 2 + 1 * 4 + 1 * 2) / 12)
    assert not [k for k in module.state_dict() if k.startswith("epoch_means")]  # checkpoints unchanged
