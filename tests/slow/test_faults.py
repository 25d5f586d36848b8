"""Faults at the edges, for real: a run directory that fills up (a small tmpfs), and a DDP rank killed with
``kill -9``. Each ends in one ``error:`` line that says what happened and what is left, exit code 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from dead_rank import rank_one  # noqa: E402  (the benchmark of the same fault finds rank 1 the same way)
from integration.hydra_helpers import TINY, TWO_CPU_RANKS  # noqa: E402

pytestmark = pytest.mark.slow


def _train(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    out = open(tmp_path / "train.out", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *TINY, *overrides],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _error_lines(tmp_path: Path) -> list[str]:
    return [ln for ln in (tmp_path / "train.out").read_text().splitlines() if ln.startswith("error: ")]


@pytest.fixture
def small_disk(tmp_path):
    """A 100 MB tmpfs (a ResNet-18 quickstart checkpoint with SGD momentum is about 56 MB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_run_directory_warns_at_start_and_ends_in_one_line(synthetic_coco, tmp_path, small_disk):
    run = small_disk / "run"
    proc = _train(tmp_path, f"data.root={synthetic_coco}", f"hydra.run.dir={run}", "trainer.max_epochs=3")
    assert proc.wait(timeout=600) == 1, (tmp_path / "train.out").read_text()[-3000:]
    output = (tmp_path / "train.out").read_text()
    # the warning came at the start of training (before any checkpoint was written), with the sizes
    warning = next(ln for ln in output.splitlines() if "the checkpoint folder" in ln)
    assert "free but the checkpoints need about" in warning and "(best.ckpt, last.ckpt and one" in warning
    # epoch 0's last.ckpt fitted; epoch 1's did not: one line, and the previous checkpoint is intact
    last = run / "checkpoints" / "last.ckpt"
    (line,) = _error_lines(tmp_path)
    assert line.startswith("error: no space left on device while writing")
    assert output.index(warning) < output.index(line)
    assert f"while writing {last} (" in line and " MB needed, " in line
    assert line.endswith(f" free); the previous checkpoint {last} is intact") and "Traceback" not in output
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 3
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_a_killed_ddp_rank_ends_the_survivor_in_one_line(synthetic_coco, tmp_path):
    run = tmp_path / "run"
    proc = _train(
        tmp_path,
        f"data.root={synthetic_coco}",
        f"hydra.run.dir={run}",
        *TWO_CPU_RANKS,
        "trainer.max_epochs=50",
    )
    try:
        victim = rank_one(proc.pid)
        last = run / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 300
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.exists(), (tmp_path / "train.out").read_text()[-3000:]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert proc.wait(timeout=120) == 1, (tmp_path / "train.out").read_text()[-3000:]
        assert time.monotonic() - killed_at < 60  # gloo notices a dead peer at once
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (line,) = _error_lines(tmp_path)
    assert line.startswith("error: rank 0 of 2 lost rank 1 (killed by SIGKILL) at epoch "), line
    assert line.endswith(f"resume with the same command and ckpt_path=last (the last checkpoint is {last})")
    torch.load(last, map_location="cpu", weights_only=True)  # what the resume would start from loads
