"""Every script's --help: what it does, its examples, the config groups and the full config (exit code 0)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from .hydra_helpers import CONF_DIR, REPO

SCRIPTS = ("train", "evaluate", "predict", "export", "benchmark")
GROUPS = (
    "callbacks: default, evaluate, fastpath",
    "data: coco",
    "experiment: nvidia_v1_1, quickstart",
    "logger: csv, mlflow, tensorboard",
    "model: ssd300",
    "trainer: cpu, ddp, default, gpu",
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_examples_groups_and_config(script):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, f"{script}.py", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    page = OmegaConf.load(CONF_DIR / "hydra" / "help" / f"{script}.yaml")
    assert text.startswith(f"{script}.py: {page.about.splitlines()[0]}")
    examples = page.examples.splitlines()
    assert 3 <= len(examples) <= 6
    for line in examples:
        assert line.startswith(f"python {script}.py ") and line in text
    assert text.index("== Examples ==") < text.index("== Config groups") < text.index("== Config (")
    for group in GROUPS:
        assert group in text
    config = text[text.index("== Config (") :]
    assert f"task_name: {script}" in config and "output_dir: ${hydra:runtime.output_dir}" in config
    assert "is powered by Hydra" not in text  # Hydra's default page is replaced
