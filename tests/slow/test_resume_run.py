"""``train.py ckpt_path=<run>/checkpoints/last.ckpt`` resumes a quickstart-like run by itself: no other
override repeated, the same run directory, the budget raised with ``++trainer.max_steps``; a data set the
checkpoint cannot follow is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ssd_lightning.data.synthetic import write_synthetic_coco

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# 15 annotated images // batch 4 = 3 batches per epoch: 4 steps end inside epoch 1
FIRST = ["experiment=quickstart", "data.batch_size=4", "data.num_threads=1", "trainer.max_steps=4",
         "callbacks.progress_bar.refresh_rate=0", "logger=[]"]  # fmt: skip


def _train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SSD_LIGHTNING_ROOT": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def test_a_run_resumes_by_itself_in_its_directory(synthetic_coco, tmp_path):
    first = _train(tmp_path, *FIRST, f"data.root={synthetic_coco}")
    assert first.returncode == 0, first.stderr[-3000:]
    [run] = (tmp_path / "outputs" / "train" / "runs").iterdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert _step(ckpt) == 4

    resumed = _train(tmp_path, f"ckpt_path={ckpt}", "++trainer.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list((tmp_path / "outputs" / "train" / "runs").iterdir()) == [run]  # no new run directory
    assert _step(ckpt) == 6
    log = (run / "train.log").read_text()
    assert log.count("epoch 1: AP ") == 2  # each run validated after its last (partial) epoch
    assert f"resuming the run {run} with its config (experiment=quickstart" in log
    assert "new overrides: ++trainer.max_steps=6\n" in log
    assert "training budget: 6 optimizer steps = 2.0 epochs of 3 batches" in log
    saved = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert f"data.root={synthetic_coco}" in saved and "++trainer.max_steps=6" in saved  # the next resume's

    # another data set (2 categories instead of 3): the checkpoint's network cannot follow it
    other = write_synthetic_coco(tmp_path / "other", num_train=8, num_val=2, seed=1, num_classes=2)
    refused = _train(tmp_path, f"ckpt_path={ckpt}", f"data.root={other}")
    assert refused.returncode == 1
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"ckpt_path {ckpt} holds SSD300(backbone=resnet18, num_classes=4)" in errors[0]
    assert _step(ckpt) == 6  # untouched, and the run's config too (Hydra had rewritten it)
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == saved
