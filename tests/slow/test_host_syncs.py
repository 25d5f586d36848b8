"""No blocking host read in a steady-state training step of train.py with the default callbacks, on one
process and on two DDP processes (CPU, gloo): every read, ``tolist``, blocking copy and barrier is counted per
loop iteration by ``HostSyncCounter`` (``tests/slow/sync_recorder.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def _train_counting(tmp_path: Path, synthetic_coco: Path, name: str, *overrides: str) -> list[dict]:
    """train.py for 2 epochs (batch 2) with the sync recorder; the per-rank records."""
    out = tmp_path / name
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "experiment=quickstart",
            f"data.root={synthetic_coco}",
            "data.batch_size=2",
            "data.num_threads=1",
            "trainer.max_epochs=2",
            "+trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=1000",  # logging steps read the logged losses: not steady-state steps
            "logger=[]",
            "+callbacks.sync_recorder._target_=sync_recorder.SyncRecorder",
            f"+callbacks.sync_recorder.out_dir={out / 'syncs'}",
            *overrides,
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted((out / "syncs").glob("syncs_rank*.json"))]


def _steady(record: dict) -> list[dict]:
    return record["steps"][2:]  # after warm-up (first steps: kernel choice, momentum buffers)


def test_one_process_steps_make_no_blocking_read_and_the_host_read_guard_makes_one(synthetic_coco, tmp_path):
    [record] = _train_counting(tmp_path, synthetic_coco, "one")
    steps = _steady(record)
    assert len(steps) >= 8  # 7 steps per epoch, 2 epochs
    assert all(s["blocking"] == 0 for s in steps), steps
    # the same count sees the guard that reads its flags before every optimizer step (the former default)
    host_guard = ["callbacks.non_finite.skip_on_device=false", "trainer.max_epochs=1"]  # 7 steps: enough
    [host] = _train_counting(tmp_path, synthetic_coco, "host", *host_guard)
    assert all(s["blocking"] == 1 and s["project"] == 1 for s in _steady(host)), _steady(host)
    assert all(any(k.startswith("tolist at nonfinite.py") for k in s["where"]) for s in _steady(host))


def test_two_ddp_processes_make_no_blocking_read_nor_barrier(synthetic_coco, tmp_path):
    """Lightning 2.6's own SIGTERM agreement reads a flag with ``.item()`` before every DDP batch; train.py's
    trainer agrees through AgreedSigtermEpochLoop (training/sigterm.py) instead, so no read is left."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    records = _train_counting(tmp_path, synthetic_coco, "two", *ddp)
    assert [r["world_size"] for r in records] == [2, 2]
    for record in records:
        steps = _steady(record)
        assert len(steps) >= 1  # 3 steps per epoch and rank
        for s in steps:
            assert s["blocking"] == 0 and not any(k.startswith("barrier") for k in s["where"]), s
