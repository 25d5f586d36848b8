"""Throughput, latency and memory benchmarks: ``python benchmark.py mode=train|inference|data|eval``.

One module per mode (:mod:`.train`, :mod:`.inference`, :mod:`.data`, :mod:`.eval`) over shared timing,
memory and reporting helpers (:mod:`.common`); :func:`run_benchmark` dispatches.

The config is ``conf/benchmark.yaml``: the training config (``conf/train.yaml``: ``data/``, ``model/``,
``trainer/``, ``experiment/`` ...) plus ``benchmark.*`` (iterations, batch sizes) and ``fastpath.*`` (the
switches of :mod:`ssd_lightning.training.fastpath`). Each mode warms up, then times
``benchmark.repeats`` samples of ``benchmark.steps_per_repeat`` iterations; images/s is reported as the
median and spread over the samples.

* ``train``: the loop ``train.py`` runs, built as it builds it (:mod:`ssd_lightning.runtime.builders`: data
  module, ``SSDModule``, the configured callbacks with the ``fastpath.*`` switches as ``callbacks.fastpath``,
  the Trainer of ``cfg.trainer``), run by ``Trainer.fit`` for ``warmup + repeats * steps_per_repeat`` steps
  without loggers and (unless ``benchmark.validate``) validation; ``benchmark.steps_per_epoch`` makes it cross
  epoch boundaries. :class:`StepTimer` takes the time between the ends of batches (data loading included),
  synchronising the device only at the sample boundaries; the record also has the data-wait share, the
  epoch-boundary gaps and the peak memory per epoch (``train.LoopTimer``) and the blocking host reads of one
  warm-up step. ``trainer.devices>1`` runs DDP; images/s is then global.
  ``benchmark.input=synthetic`` feeds the same step with one batch made on the device (random images, random
  targets in the ``box_encoder`` format) instead of DALI: the model, loss and optimizer alone, and no DALI
  needed.
* ``inference``: end to end, input on the device -> detections (network + decode + NMS + top-k, as
  ``SSD300.detect``), one synchronised latency per batch; p50/p99 latency and images/s. ``benchmark.input``:
  ``synthetic`` (random images already on the device; the default here) or ``dali`` (batches of the DALI
  validation pipeline; loading included in the time).
* ``data``: the data module's train (and/or val) loader alone, images/s.
* ``eval``: :func:`ssd_lightning.evaluation.evaluate_detections` on a generated COCO-val-sized set
  (``benchmark.eval.images`` images, ``detections_per_image`` detections each), images/s per back end, and a
  check that the back ends give the same 12 numbers.

Results are printed as a table and written (rank 0, atomically) to ``<run dir>/benchmark.json``: the machine
(CPU model, cores, load average before and after, device name, versions), the resolved settings
(precision, batch size, device, fast-path switches) and one record per run (per batch size, split or back
end), with peak device memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of the process during the timed
part).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssd_lightning.errors import ConfigError
from ssd_lightning.fileio import write_json_atomic
from ssd_lightning.runtime.ddp_sweeps import install_ddp_sweep_support
from ssd_lightning.runtime.devices import resolve_device
from ssd_lightning.tasks.benchmark.common import (
    MODES,
    RESULTS_FILE,
    PeakMemory,
    benchmark_settings,
    format_results,
    load_average,
    machine_info,
    percentile,
    summarize,
)
from ssd_lightning.tasks.benchmark.data import bench_data
from ssd_lightning.tasks.benchmark.eval import bench_eval, synthetic_coco_results
from ssd_lightning.tasks.benchmark.inference import bench_inference
from ssd_lightning.tasks.benchmark.train import DeviceBatches, StepTimer, bench_train

__all__ = [
    "MODES",
    "DeviceBatches",
    "PeakMemory",
    "StepTimer",
    "format_results",
    "percentile",
    "run_benchmark",
    "summarize",
    "synthetic_coco_results",
]

log = logging.getLogger("ssd_lightning")


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.mode``; print the table and write ``benchmark.json`` (rank 0). Returns the result dict."""

    mode = str(cfg.get("mode"))
    if mode not in MODES:
        raise ConfigError(f"mode={cfg.get('mode')}: use mode=train, inference, data or eval")
    settings = benchmark_settings(cfg)
    bench = settings["benchmark"]
    if bench.get("threads"):
        torch.set_num_threads(int(bench["threads"]))
    device = (
        torch.device("cpu")
        if mode == "eval"
        else resolve_device(cfg.trainer.get("accelerator"), "trainer.accelerator")
    )
    devices = cfg.trainer.get("devices", 1)
    if mode != "train" and str(devices) not in ("1", "auto") and devices != 1:
        log.warning(
            "mode=%s runs on one device; trainer.devices=%s is used by mode=train only", mode, devices
        )
    if mode == "train":
        install_ddp_sweep_support()
    load_before = load_average()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    runs: list[dict[str, Any]] = []
    is_zero = True
    for batch_size in bench["batch_sizes"] if mode != "eval" else [None]:
        if mode == "train":
            record, is_zero = bench_train(cfg, settings, batch_size)
            runs.append(record)
        elif mode == "inference":
            runs.append(bench_inference(cfg, settings, batch_size))
        elif mode == "data":
            for split in bench.get("splits") or ["train"]:
                if split not in ("train", "val"):
                    raise ConfigError(f"benchmark.splits: {split!r}; use train and/or val")
                runs.append(bench_data(cfg, settings, batch_size, split))
        else:
            runs.extend(bench_eval(cfg, settings))
    result = {
        "mode": mode,
        "started": started,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "overrides": task_overrides(),
        "machine": machine_info(device),
        "load_average": {"before": load_before, "after": load_average()},
        "settings": {
            "precision": str(cfg.trainer.get("precision")),
            "backbone": str(cfg.model.get("backbone")),
            "batch_sizes": bench["batch_sizes"],
            "data_device": str(cfg.data.get("device")),
            "prefetch_queue_depth": cfg.data.get("prefetch_queue_depth"),
            "cudnn_benchmark": settings["fastpath"].get("cudnn_benchmark"),
            "fastpath": settings["fastpath"],
            "benchmark": {k: v for k, v in bench.items() if k != "batch_sizes"},
        },
        "runs": runs,
    }
    if is_zero:
        out = Path(cfg.paths.output_dir) / str(bench.get("output_file") or RESULTS_FILE)
        write_json_atomic(out, result, indent=2)
        print(format_results(result), flush=True)
        log.info("benchmark results written to %s", out)
    return result


def task_overrides() -> list[str]:
    """The command line's overrides of this run (empty outside Hydra)."""
    with contextlib.suppress(Exception):
        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    return []
