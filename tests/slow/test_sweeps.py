"""Sweeps through the real entry point: each job trains exactly once, in its own job directory, with its own
values on every DDP rank; the task function returns the optimised metric to the sweeper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = [
    "experiment=quickstart",
    "data.batch_size=4",
    "data.num_threads=1",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar.refresh_rate=0",
]


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SSD_LIGHTNING_ROOT": str(tmp_path / "root")}
    flags = [o for o in overrides if o.startswith("-")]  # -m before the overrides (argparse)
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *flags, *TINY, *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _lr_of(job: Path) -> float:
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["hyper_parameters"]["lr"]


def _assert_single_runs(tmp_path: Path) -> None:
    # a DDP rank that restarted the sweep, or ran as a default single run, would leave directories here
    assert not (tmp_path / "root" / "outputs" / "train" / "runs").exists()
    multiruns = tmp_path / "root" / "outputs" / "train" / "multiruns"
    assert not multiruns.exists() or not any(multiruns.iterdir())


def test_basic_sweep_trains_each_job_once(synthetic_coco, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _train(
        tmp_path, "-m", f"data.root={synthetic_coco}", "optim.lr=0.01,0.02", f"hydra.sweep.dir={sweep}"
    )
    jobs = _job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    assert [_lr_of(j) for j in jobs] == [0.01, 0.02]
    for job in jobs:
        assert (job / "checkpoints" / "best.ckpt").is_file() and (job / ".hydra" / "config.yaml").is_file()
        assert (job / "train.log").read_text().count("`Trainer.fit` stopped") <= 1
    assert proc.stdout.count("COCO evaluation after 1 epochs:") == 2
    _assert_single_runs(tmp_path)


def test_optuna_sweep_returns_val_ap(synthetic_coco, tmp_path):
    sweep = tmp_path / "optuna"
    _train(
        tmp_path,
        "hparams_search=optuna",
        f"data.root={synthetic_coco}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = _job_dirs(sweep)
    assert len(jobs) == 2
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.lr", "optim.warmup_steps", "optim.weight_decay"}
    final_ap = []
    for job in jobs:
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        sampled = float(next(o.split("=", 1)[1] for o in overrides if o.startswith("optim.lr=")))
        assert ckpt["hyper_parameters"]["lr"] == pytest.approx(sampled)
        best_state = next(v for k, v in ckpt["callbacks"].items() if "val/AP" in k)
        final_ap.append(float(best_state["best_model_score"]))
    assert results["best_value"] == pytest.approx(max(final_ap), abs=1e-6)
    _assert_single_runs(tmp_path)


def test_ddp_ranks_of_a_sweep_job_run_that_job(synthetic_coco, tmp_path):
    """2 jobs x 2 CPU ranks: rank 1 of each job runs as a single run of that job, in that job's directory."""
    sweep = tmp_path / "ddp_sweep"
    _train(
        tmp_path,
        "-m",
        f"data.root={synthetic_coco}",
        "data.batch_size=2",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "optim.lr=0.01,0.03",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = _job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    for job, lr in zip(jobs, ("0.01", "0.03"), strict=True):
        rank1 = (job / "train_rank1.log").read_text()
        assert "rank 1 of 2 (fit)" in rank1 and f"optim.lr={lr} " in rank1, rank1
        assert "rank 0 of 2 (fit)" in (job / "train.log").read_text()
        assert _lr_of(job) == float(lr)
    _assert_single_runs(tmp_path)
