"""train.py killed from outside: SIGTERM (preemption) writes a checkpoint and exits 143 in time; kill -9
during a checkpoint write leaves the previous checkpoint complete; SLURM's SIGUSR1 makes Lightning write its
HPC checkpoint and requeue the job, which then resumes by itself. Each killed run is a subprocess; the
resumed runs finish in-process."""

from __future__ import annotations

import logging
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
from integration.hydra_helpers import TINY, TWO_CPU_RANKS, compose_config  # noqa: E402

from ssd_lightning.tasks.train import train  # noqa: E402

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 3  # 15 annotated train images // batch 4
EPOCHS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    """The in-process resumes on one torch thread, as the subprocesses (OMP_NUM_THREADS=1): a busy 2-core
    machine makes two threads several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _start(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(tmp_path / "train.out", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *TINY, f"trainer.max_epochs={EPOCHS}", *overrides],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _output(tmp_path: Path) -> str:
    return (tmp_path / "train.out").read_text()


def _resume(run_dir: Path, *overrides: str) -> dict:
    cfg = compose_config("train", [*TINY, f"trainer.max_epochs={EPOCHS}", *overrides], run_dir)
    _, objects = train(cfg)
    return objects


def test_sigterm_writes_a_checkpoint_and_exits_143_then_ckpt_path_last_resumes(
    synthetic_coco, tmp_path, monkeypatch, caplog
):
    root = tmp_path / "root"
    runs = root / "outputs" / "train" / "runs"
    proc = _start(tmp_path, f"data.root={synthetic_coco}", env={"SSD_LIGHTNING_ROOT": str(root)})
    _wait_for(lambda: any(runs.glob("*/checkpoints/last.ckpt")), proc, "the first checkpoint")
    time.sleep(1.0)  # somewhere in epoch 1 (or its checkpoint write: also fine)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=120)
    elapsed = time.monotonic() - sent
    assert returncode == 143, _output(tmp_path)[-3000:]
    assert elapsed < 60, elapsed  # one training step and a checkpoint write
    assert "SIGTERM: stopped at epoch" in _output(tmp_path)
    [killed] = list(runs.glob("*/checkpoints/last.ckpt"))
    ckpt = torch.load(killed, map_location="cpu", weights_only=True)
    assert STEPS_PER_EPOCH <= ckpt["global_step"] < EPOCHS * STEPS_PER_EPOCH
    assert not list(runs.glob("*/checkpoints/*.tmp"))

    monkeypatch.delenv("SSD_LIGHTNING_RESUME_LAST", raising=False)
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        objects = _resume(
            runs / "resumed", f"data.root={synthetic_coco}", "ckpt_path=last", f"paths.root_dir={root}"
        )
    assert f"ckpt_path=last: resuming from {killed}" in caplog.text
    assert objects["trainer"].global_step == EPOCHS * STEPS_PER_EPOCH
    assert objects["model"].val_metrics is not None


def test_kill_9_during_a_checkpoint_write_then_resume(synthetic_coco, tmp_path, monkeypatch):
    run = tmp_path / "run"
    marker = tmp_path / "stalled"
    proc = _start(
        tmp_path,
        f"data.root={synthetic_coco}",
        f"hydra.run.dir={run}",
        "trainer.plugins=[{_target_: tests.slow.stalling_io.StallingCheckpointIO}]",
        env={"STALL_MARKER": str(marker), "STALL_ON_SAVE": "2"},
    )
    _wait_for(marker.exists, proc, "the second checkpoint write (end of epoch 1)")
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9, the DALI threads and all
    assert proc.wait(timeout=60) == -signal.SIGKILL
    ckpt_dir = run / "checkpoints"
    assert (ckpt_dir / "last.ckpt.tmp").is_file()  # the write that was cut short
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)  # complete
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == STEPS_PER_EPOCH

    monkeypatch.delenv("SSD_LIGHTNING_RESUME_LAST", raising=False)
    # the same run directory (a fixed hydra.run.dir): ckpt_path=last is its own last.ckpt, the .tmp is ignored
    objects = _resume(run, f"data.root={synthetic_coco}", "ckpt_path=last")
    assert objects["trainer"].global_step == EPOCHS * STEPS_PER_EPOCH
    assert not (ckpt_dir / "last.ckpt.tmp").exists()  # replaced by the resumed run's own writes
    final = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["epoch"] == EPOCHS - 1 and final["global_step"] == EPOCHS * STEPS_PER_EPOCH


def test_kill_9_mid_training_then_resume_equals_the_uninterrupted_run(
    synthetic_coco, tmp_path, monkeypatch, caplog
):
    """kill -9 (the process group: DALI threads and all) at an arbitrary moment of epoch 1: the last complete
    checkpoint is epoch 0's; resuming from it re-runs epoch 1 with the same data order and ends with the
    weights of a run that was never killed."""
    killed = tmp_path / "killed"
    proc = _start(tmp_path, f"data.root={synthetic_coco}", f"hydra.run.dir={killed}")
    _wait_for((killed / "checkpoints" / "last.ckpt").exists, proc, "the first checkpoint")
    time.sleep(1.5)  # inside epoch 1
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    last = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert STEPS_PER_EPOCH <= last["global_step"] < EPOCHS * STEPS_PER_EPOCH

    monkeypatch.delenv("SSD_LIGHTNING_RESUME_LAST", raising=False)
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        resumed = _resume(killed, f"data.root={synthetic_coco}", "ckpt_path=last")["model"]
    assert f"resuming from {killed / 'checkpoints' / 'last.ckpt'}" in caplog.text
    uninterrupted = _resume(tmp_path / "full", f"data.root={synthetic_coco}")["model"]
    a, b = resumed.state_dict(), uninterrupted.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert resumed.trainer.global_step == uninterrupted.trainer.global_step == EPOCHS * STEPS_PER_EPOCH


SLURM_ENV = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


def test_slurm_sigusr1_requeues_and_the_requeued_job_resumes(synthetic_coco, tmp_path, monkeypatch):
    """sbatch --signal=SIGUSR1@90 --requeue: Lightning writes hpc_ckpt_1.ckpt and runs `scontrol requeue`;
    SLURM then ends the job with SIGTERM (here: the fake scontrol does); the requeued job, same job id, same
    run directory, no ckpt_path, resumes from the HPC checkpoint by itself."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -TERM $PPID\n')
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "slurm-4242"  # hydra.run.dir=outputs/train/slurm-${SLURM_JOB_ID} in the job script
    env = {**SLURM_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = _start(tmp_path, f"data.root={synthetic_coco}", f"hydra.run.dir={run}", env=env)
    _wait_for((run / "checkpoints" / "last.ckpt").exists, proc, "the first checkpoint")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 143, _output(tmp_path)[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["global_step"] >= STEPS_PER_EPOCH
    logged = (run / "csv" / "metrics.csv").read_text()

    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SSD_LIGHTNING_RESUME_LAST", raising=False)
    objects = _resume(run, f"data.root={synthetic_coco}")  # the requeued job: same command, same directory
    assert objects["trainer"].global_step == EPOCHS * STEPS_PER_EPOCH
    assert objects["trainer"].ckpt_path == str(run / "hpc_ckpt_1.ckpt")
    assert (run / "csv" / "metrics.1.csv").read_text() == logged  # the first attempt's metrics are kept


def _ddp_train(tmp_path: Path, run: Path, data: Path, *overrides: str) -> subprocess.Popen:
    """train.py on 2 CPU DDP processes (Lightning starts rank 1), batch 2 per rank: 3 steps per epoch."""
    return _start(
        tmp_path,
        f"data.root={data}",
        f"hydra.run.dir={run}",
        *TWO_CPU_RANKS,
        *overrides,
    )


def test_ddp_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(synthetic_coco, tmp_path):
    """Kubernetes-style preemption of a 2-process DDP run: SIGTERM to the launching process only (Lightning
    forwards it to the rank it started); both ranks stop at the same step, one checkpoint is written, no
    process is left behind; the resumed run ends with the weights of a run that was never stopped."""
    killed = tmp_path / "killed"
    proc = _ddp_train(tmp_path, killed, synthetic_coco)
    _wait_for((killed / "checkpoints" / "last.ckpt").exists, proc, "the first checkpoint")
    time.sleep(0.2)  # early in epoch 1: the ranks agree on the stop one batch later (training/sigterm.py)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, _output(tmp_path)[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # rank 1 (same session) must end too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("a DDP rank outlived the SIGTERM")
    stopped = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < stopped["global_step"] < 3 * EPOCHS

    resumed = _ddp_train(tmp_path, killed, synthetic_coco, "ckpt_path=last")
    assert resumed.wait(timeout=300) == 0, _output(tmp_path)[-3000:]
    assert f"resuming from {killed / 'checkpoints' / 'last.ckpt'}" in _output(tmp_path)
    full = tmp_path / "full"
    uninterrupted = _ddp_train(tmp_path, full, synthetic_coco)
    assert uninterrupted.wait(timeout=300) == 0, _output(tmp_path)[-3000:]

    a = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 * EPOCHS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
