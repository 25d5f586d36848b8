"""GPU defaults decided on the CPU: cuDNN autotuning for CUDA trainers, the tuned DDP trainer in the NVIDIA
experiment (composed as ``train.py --cfg job`` prints it), a DDP strategy on one device run as a plain one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from ssd_lightning.runtime.builders import build_trainer, resolved_trainer_settings

from .hydra_helpers import compose_config

REPO = Path(__file__).resolve().parents[2]
DDP = {"_target_": "pytorch_lightning.strategies.DDPStrategy", "gradient_as_bucket_view": True}


@pytest.mark.parametrize(
    ("trainer", "cuda", "expected"),
    [
        ({"accelerator": "auto", "benchmark": None}, True, {"benchmark": True}),
        ({"accelerator": "auto", "benchmark": None}, False, {}),
        ({"accelerator": "gpu", "benchmark": None}, False, {"benchmark": True}),  # what Lightning will use
        ({"accelerator": "cuda"}, True, {"benchmark": True}),
        ({"accelerator": "cpu", "benchmark": None}, True, {}),
        ({"accelerator": "gpu", "benchmark": False}, True, {}),  # set by the user: kept
        ({"accelerator": "gpu", "benchmark": None, "deterministic": True}, True, {}),
        ({"accelerator": "cpu", "strategy": DDP, "devices": 1, "num_nodes": 1}, False, {"strategy": "auto"}),
        ({"accelerator": "cpu", "strategy": DDP, "devices": [3]}, False, {"strategy": "auto"}),
        ({"accelerator": "cpu", "strategy": DDP, "devices": 2}, False, {}),
        ({"accelerator": "cpu", "strategy": DDP, "devices": 1, "num_nodes": 2}, False, {}),
        ({"accelerator": "cpu", "strategy": "ddp", "devices": 1}, False, {}),  # a name: Lightning's choice
    ],
)
def test_trainer_settings_resolved_from_the_machine(trainer, cuda, expected):
    assert resolved_trainer_settings(OmegaConf.create(trainer), cuda_available=cuda) == expected


def _cfg_job(*overrides: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides, "--cfg", "job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return yaml.safe_load(out)


def test_nvidia_experiment_uses_the_tuned_ddp_trainer():
    trainer = _cfg_job("experiment=nvidia_v1_1")["trainer"]
    assert trainer["strategy"]["_target_"] == "pytorch_lightning.strategies.DDPStrategy"
    assert trainer["strategy"]["gradient_as_bucket_view"] is True
    assert trainer["strategy"]["find_unused_parameters"] is False
    assert (trainer["accelerator"], trainer["precision"], trainer["benchmark"]) == ("gpu", "16-mixed", True)
    assert trainer["devices"] == 1
    assert resolved_trainer_settings(OmegaConf.create(trainer), cuda_available=True) == {"strategy": "auto"}
    eight = _cfg_job("experiment=nvidia_v1_1", "trainer.devices=8")["trainer"]
    assert resolved_trainer_settings(OmegaConf.create(eight), cuda_available=True) == {}


def test_build_trainer_runs_a_one_device_ddp_config_as_a_single_device_trainer(tmp_path):
    cfg = compose_config(
        "train", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"],
        tmp_path,
    )  # fmt: skip
    before = torch.backends.cudnn.benchmark
    try:
        trainer = build_trainer(cfg, [], [])
    finally:
        torch.backends.cudnn.benchmark = before  # trainer=ddp sets it (a global flag)
    assert type(trainer.strategy).__name__ == "SingleDeviceStrategy"
    two = build_trainer(cfg, [], [], devices=2)  # overrides count: two processes keep the tuned DDP
    assert type(two.strategy).__name__ == "DDPStrategy" and two.world_size == 2
    torch.backends.cudnn.benchmark = before
