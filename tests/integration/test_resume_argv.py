"""``train.py ckpt_path=<a run's checkpoint>``: the command line rewritten to that run's overrides plus the
new ones, in its directory, before Hydra composes (no training here: tests/slow/test_resume_run.py trains)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssd_lightning.errors import ConfigError
from ssd_lightning.runtime.resume import RESUMED, resume_argv

from .hydra_helpers import CONF_DIR, REPO


def _run_dir(root: Path, overrides: list[str], backbone: str = "resnet18") -> Path:
    """A run directory as train.py leaves it: .hydra/{overrides,config}.yaml and checkpoints/last.ckpt."""
    (root / ".hydra").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (root / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": backbone}}))
    choices = {"experiment": "quickstart", "model": "ssd300"}
    (root / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (root / "checkpoints" / "last.ckpt").write_bytes(b"not read before Hydra composes")
    return root


def test_the_runs_overrides_then_the_new_ones_in_its_directory(tmp_path):
    run = _run_dir(tmp_path / "run", ["experiment=quickstart", "+extra.key=1", "trainer.max_steps=4"])
    ckpt = run / "checkpoints" / "last.ckpt"
    argv = ["train.py", f"ckpt_path={ckpt}", "++trainer.max_steps=8", "extra.key=2", "seed=3"]
    assert resume_argv(argv, CONF_DIR) == [
        "train.py",
        "experiment=quickstart",
        "++extra.key=2",  # the run added the key: the new value is written so that it still composes
        "++trainer.max_steps=8",
        f"ckpt_path={ckpt}",
        "seed=3",
        f"hydra.run.dir='{run}'",
    ]
    [resumed] = RESUMED
    assert resumed.run_dir == run and resumed.new == ("++trainer.max_steps=8", "extra.key=2", "seed=3")


def test_commands_that_are_not_a_runs_resume_are_left_alone(tmp_path):
    run = _run_dir(tmp_path / "run", ["experiment=quickstart"])
    elsewhere = tmp_path / "copied.ckpt"
    elsewhere.write_bytes(b"x")
    for argv in (
        ["train.py", "experiment=quickstart"],  # no ckpt_path
        ["train.py", f"ckpt_path={elsewhere}", "experiment=quickstart"],  # a file outside a run directory
        [
            "train.py",
            "-m",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        ],  # a sweep: jobs resume their own
    ):
        assert resume_argv(argv, CONF_DIR) == argv
    with pytest.raises(ConfigError, match=r"ckpt_path .*missing.ckpt not found: pass a train.py checkpoint"):
        resume_argv(["train.py", f"ckpt_path={tmp_path / 'missing.ckpt'}"], CONF_DIR)


def test_ckpt_path_last_finds_the_newest_run_and_its_config(tmp_path):
    runs = tmp_path / "outputs" / "train" / "runs"
    older = _run_dir(runs / "2026-01-01_00-00-00", ["data.root=/a"])
    newer = _run_dir(runs / "2026-01-02_00-00-00", ["data.root=/b"])
    os.utime(older / "checkpoints" / "last.ckpt", (1, 1))
    argv = resume_argv(["train.py", "ckpt_path=last", f"paths.root_dir={tmp_path}"], CONF_DIR)
    assert argv == ["train.py", "data.root=/b", "ckpt_path=last", f"paths.root_dir={tmp_path}",
                    f"hydra.run.dir='{newer}'"]  # fmt: skip
    # a fixed run directory (a requeued job) is its own run
    argv = resume_argv(["train.py", "ckpt_path=last", f"hydra.run.dir={older}"], CONF_DIR)
    assert argv == ["train.py", "data.root=/a", "ckpt_path=last", f"hydra.run.dir={older}"]


@pytest.mark.parametrize(
    ("override", "was"),
    [
        ("model.backbone=resnet34", "model.backbone=resnet18"),
        ("experiment=nvidia_v1_1", "experiment=quickstart"),
    ],
)
def test_an_override_the_checkpoint_cannot_follow_is_one_error_line(tmp_path, override, was):
    run = _run_dir(tmp_path / "run", ["experiment=quickstart"])
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"ckpt_path={ckpt}", override],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {override} would change the model or recipe of the run {run}"
    )
    assert f"({was} in its .hydra/)" in lines[0] and f"model.init_from={ckpt}" in lines[0]
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == ["experiment=quickstart"]


def test_repeating_the_runs_model_and_recipe_is_allowed(tmp_path):
    run = _run_dir(tmp_path / "run", ["experiment=quickstart"])
    argv = ["train.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "experiment=quickstart"]
    argv += ["model=ssd300", "model.backbone=resnet18"]  # the run's own (model=ssd300: the default option)
    assert resume_argv(argv, CONF_DIR)[1:4] == ["experiment=quickstart", argv[1], "model=ssd300"]
