"""``benchmark.py mode=data``: the data module's train and/or val loader alone, images/s."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

from omegaconf import DictConfig

from ssd_lightning.runtime.devices import resolve_device
from ssd_lightning.tasks.benchmark.common import (
    PeakMemory,
    batches_forever,
    datamodule_for,
    summarize,
    synchronize,
)


def bench_data(cfg: DictConfig, settings: dict[str, Any], batch_size: int, split: str) -> dict[str, Any]:
    bench = settings["benchmark"]
    device = resolve_device(cfg.trainer.get("accelerator"), "trainer.accelerator")
    datamodule = datamodule_for(cfg, device, batch_size)
    datamodule.setup("fit" if split == "train" else "validate")
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    batches = batches_forever(loader)
    for _ in range(bench["warmup"]):
        next(batches)
    peak = PeakMemory(device)
    peak.reset()
    rates, seconds = [], []
    for _ in range(bench["repeats"]):
        synchronize(device)
        t = time.perf_counter()
        images = 0
        for _ in range(bench["steps_per_repeat"]):
            images += int(next(batches)["images"].shape[0])
        synchronize(device)
        dt = time.perf_counter() - t
        seconds.append(dt)
        rates.append(images / dt)
    memory = peak.read()
    runtime = getattr(datamodule, "_runtime", None) or {}
    with contextlib.suppress(Exception):
        datamodule.teardown("fit")
    threads = int(getattr(datamodule, "num_threads", 0) or 0)
    median = statistics.median(rates)
    return {
        "mode": "data",
        "split": split,
        "batch_size": batch_size,
        "device": str(device),
        "data_device": runtime.get("decode"),
        "num_threads": threads,
        "precision": str(cfg.trainer.get("precision", "32-true")),
        "steps": {"warmup": bench["warmup"], "timed": bench["repeats"] * bench["steps_per_repeat"]},
        "images_per_s": summarize(rates),
        "images_per_s_per_thread": median / threads if threads else None,
        "memory": memory,
    }
