"""Memory over a long run: resident memory (RSS), threads, open files (and CUDA memory on a GPU) at the end of
every epoch of the quickstart recipe, to show that nothing grows epoch after epoch (DALI pipelines are rebuilt
every epoch, validation gathers detections, checkpoints are written every epoch).

The run is ``train.py experiment=quickstart`` (ResNet-18 SSD300 from scratch, batch 16, DALI CPU pipeline,
bf16 where the CPU has it) on a smaller synthetic set so that 30 epochs fit in minutes on 2 cores, validating
every 5 epochs (COCO evaluation included) and writing last.ckpt every epoch, in this process (train).

Usage::

    python benchmarks/memory_soak.py [--epochs 30] [--train-images 128] [--val-images 32] [--out DIR]
        [--threads N] [--no-trim] [overrides ...]

Writes ``<out>/memory.csv`` (see :class:`MemoryLog`: RSS before and after handing the C heap's free memory
back to the OS, Python objects, threads, open files, CUDA memory) and prints a Markdown summary; results are
recorded in benchmarks/results/memory_soak.md.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from ssd_lightning.tasks.train import train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status(field: str) -> int:
    """A number of /proc/self/status (``VmRSS`` in kB, ``Threads``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _malloc_trim() -> bool:
    """Give the C heap's free memory back to the OS (glibc); False where unavailable."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


COLUMNS = [
    "epoch",
    "seconds",
    "rss_mb",
    "rss_trimmed_mb",
    "py_objects",
    "threads",
    "open_files",
    "cuda_allocated_mb",
    "cuda_reserved_mb",
]


class MemoryLog(pl.Callback):
    """Appends one row per training epoch end (after that epoch's validation) to ``path``.

    ``rss_mb`` is the resident memory as the epoch left it; then the C heap's free pages are handed back to
    the OS (glibc ``malloc_trim``) and ``rss_trimmed_mb`` is measured: memory still in use. A leak grows both;
    heap fragmentation (freed memory glibc keeps for reuse) grows only the first. ``py_objects``: objects
    the Python garbage collector tracks (a Python-level leak grows it).
    """

    def __init__(self, path: str, trim: bool = True) -> None:
        self.path = Path(path)
        self.trim = bool(trim)
        self.start = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        rss = round(_status("VmRSS") / 1024, 1)
        gc.collect()
        trimmed = round(_status("VmRSS") / 1024, 1) if self.trim and _malloc_trim() else ""
        row = [
            trainer.current_epoch,
            round(time.monotonic() - self.start, 1),
            rss,
            trimmed,
            len(gc.get_objects()),
            _status("Threads"),
            len(os.listdir("/proc/self/fd")),
            round(torch.cuda.memory_allocated() / 2**20, 1) if cuda else "",
            round(torch.cuda.memory_reserved() / 2**20, 1) if cuda else "",
        ]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(row)
        print("memory", dict(zip(COLUMNS[:7], row[:7], strict=True)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "memory_soak")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-trim", action="store_true", help="no malloc_trim (rss_trimmed_mb empty)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of conf/train.yaml")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out.resolve()
    csv_path = out / "memory.csv"
    overrides = [
        "experiment=quickstart",
        f"synthetic.root={out / 'data'}",
        f"synthetic.num_train={args.train_images}",
        f"synthetic.num_val={args.val_images}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.max_steps=-1",  # the quickstart's step budget would end a long soak early
        "trainer.check_val_every_n_epoch=5",
        "callbacks.validation_schedule.epochs=null",  # every 5 epochs, not only after the last
        f"optim.milestones=[{max(args.epochs - 2, 1)}]",
        "callbacks.progress_bar.refresh_rate=0",
        "+callbacks.memory_log._target_=__main__.MemoryLog",
        f"+callbacks.memory_log.path={csv_path}",
        f"+callbacks.memory_log.trim={not args.no_trim}",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out / "run")
        cfg.paths.output_dir = str(out / "run")
        cfg.hydra.job.name = "train"
        cfg.hydra.mode = "RUN"
    HydraConfig.instance().set_config(cfg)

    started = time.monotonic()
    train(cfg)
    wall = time.monotonic() - started

    rows = list(csv.DictReader(open(csv_path)))
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(
        f"{len(rows)} epochs in {wall / 60:.1f} min; precision {cfg.trainer.precision}; "
        f"{torch.get_num_threads()} torch threads; csv: {csv_path}\n"
    )
    print("| epoch | RSS (MB) | RSS after malloc_trim (MB) | Python objects | threads | open files |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {int(r['epoch']) + 1} | {r['rss_mb']} | {r['rss_trimmed_mb']} | {r['py_objects']} | "
            f"{r['threads']} | {r['open_files']} |"
        )
    if len(rows) > 10:
        for column in ("rss_mb", "rss_trimmed_mb"):
            if not rows[0][column]:
                continue
            values = [float(r[column]) for r in rows]
            n = len(values)
            slope = statistics.linear_regression(range(5, n), values[5:]).slope
            print(
                f"{column}: epoch 5 -> {n}: {values[4]:.0f} -> {values[-1]:.0f} MB "
                f"({values[-1] - values[4]:+.0f}); "
                f"mean of epochs 6-10 {statistics.mean(values[5:10]):.0f}, of the last 5 "
                f"{statistics.mean(values[-5:]):.0f}; trend over epochs 6-{n} {slope:+.2f} MB/epoch; "
                f"max {max(values):.0f}"
            )


if __name__ == "__main__":
    main()
