"""Throughput, latency and memory benchmarks: ``python benchmark.py mode=train|inference|data|eval``.

The config is ``conf/benchmark.yaml``: the training config (``conf/train.yaml``: ``data/``, ``model/``,
``trainer/``, ``experiment/`` ...) plus ``benchmark.*`` (iterations, batch sizes) and ``fastpath.*`` (the
switches of :mod:`ssd_lightning.fastpath`). Each mode warms up, then times ``benchmark.repeats`` samples of
``benchmark.steps_per_repeat`` iterations; images/s is reported as the median and spread over the samples.

* ``train``: the real Lightning training step (``SSDModule`` + ``MultiBoxLoss`` + SGD) fed by the real data
  module (DALI), built from the same config as ``train.py`` (:func:`ssd_lightning.cli.build_datamodule`,
  :func:`~ssd_lightning.cli.build_module`, ``cfg.trainer``), run by ``Trainer.fit`` for
  ``warmup + repeats * steps_per_repeat`` steps with validation, checkpoints, loggers and the progress bar
  off. :class:`StepTimer` takes the time between the ends of batches (data loading included), synchronising
  the device only at the sample boundaries. ``trainer.devices>1`` runs DDP; images/s is then global.
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
import functools
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ssd_lightning.cli import ConfigError
from ssd_lightning.fastpath import (
    OPTIMIZER_IMPLS,
    FastPathCallback,
    HostSyncCounter,
    compile_module,
    set_backend_flags,
)
from ssd_lightning.postprocess import POSTPROCESS_NMS_METHODS, postprocess

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

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("train", "inference", "data", "eval")
RESULTS_FILE = "benchmark.json"


# ----------------------------------------------------------------------------------------------------
# Statistics, machine, memory
# ----------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median, mean, min, max, p25, p75 and sample count of ``values``."""
    values = [float(v) for v in values]
    if not values:
        return {"median": float("nan"), "n": 0}
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "p25": percentile(values, 25),
        "p75": percentile(values, 75),
        "n": len(values),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures come from: CPU, cores, threads, accelerator, library versions."""
    import pytorch_lightning
    import torchvision

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "device": str(device),
    }
    with contextlib.suppress(ImportError):
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device_name"] = info["cpu"]
    return info


def _read_status_kb(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


class PeakMemory:
    """Peak memory over a stretch of code: CUDA ``max_memory_allocated`` (and reserved) on a GPU, and the
    peak resident set size of the process (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; where
    that cannot be reset, the process-lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_reset = False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.rss_reset = True
        except OSError:
            self.rss_reset = False

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.device.type == "cuda":
            out["device_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            out["device_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
        hwm = _read_status_kb("VmHWM")
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_bytes"] = int(hwm) * 1024
        out["peak_rss_scope"] = "timed part" if self.rss_reset else "process lifetime"
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------------


def resolve_device(accelerator: str | None) -> torch.device:
    """The device of ``trainer.accelerator``: ``auto`` (CUDA when visible, else CPU), ``gpu``/``cuda``,
    ``cpu``, ``mps``."""
    name = str(accelerator or "auto").lower()
    if name == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator} but no CUDA device is visible; "
                "use trainer.accelerator=cpu"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if name in ("cpu", "mps"):
        return torch.device(name)
    raise ConfigError(f"trainer.accelerator={accelerator}: use auto, gpu, cpu or mps")


def precision_settings(precision: Any, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None, parameter dtype) of a Lightning precision string."""
    p = str(precision)
    table: dict[str, tuple[torch.dtype | None, torch.dtype]] = {
        "32-true": (None, torch.float32),
        "32": (None, torch.float32),
        "bf16-mixed": (torch.bfloat16, torch.float32),
        "16-mixed": (torch.float16, torch.float32),
        "bf16-true": (None, torch.bfloat16),
        "16-true": (None, torch.float16),
        "bf16": (torch.bfloat16, torch.float32),
        "16": (torch.float16, torch.float32),
    }
    if p not in table:
        raise ConfigError(
            f"trainer.precision={precision}: use 32-true, bf16-mixed, 16-mixed, bf16-true or 16-true"
        )
    return table[p]


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """benchmark.* and fastpath.* as plain, checked values."""
    bench = OmegaConf.to_container(cfg.benchmark, resolve=True)
    fast = OmegaConf.to_container(cfg.fastpath, resolve=True)
    for key in ("warmup", "repeats", "steps_per_repeat"):
        if int(bench[key]) < (0 if key == "warmup" else 1):
            raise ConfigError(f"benchmark.{key}={bench[key]}: must be >= {0 if key == 'warmup' else 1}")
    if fast["optimizer"] not in OPTIMIZER_IMPLS:
        raise ConfigError(f"fastpath.optimizer={fast['optimizer']}: use one of {', '.join(OPTIMIZER_IMPLS)}")
    if fast["nms_method"] not in POSTPROCESS_NMS_METHODS:
        raise ConfigError(
            f"fastpath.nms_method={fast['nms_method']}: use one of {', '.join(POSTPROCESS_NMS_METHODS)}"
        )
    if bench.get("input") not in (None, "synthetic", "dali"):
        raise ConfigError(
            f"benchmark.input={bench['input']}: use synthetic or dali (null: the mode's default)"
        )
    if bench.get("input") is None:
        bench["input"] = "dali" if str(cfg.get("mode")) == "train" else "synthetic"
    if bench.get("profiler") not in (None, "simple", "pytorch"):
        raise ConfigError(f"benchmark.profiler={bench['profiler']}: use simple, pytorch or null")
    sizes = bench.get("batch_sizes")
    if sizes is None:
        sizes = [int(cfg.data.batch_size)]
    elif isinstance(sizes, int):
        sizes = [sizes]
    if not sizes or any(int(b) < 1 for b in sizes):
        raise ConfigError(f"benchmark.batch_sizes={sizes}: a list of positive batch sizes (or null)")
    bench["batch_sizes"] = [int(b) for b in sizes]
    return {"benchmark": bench, "fastpath": fast}


def _with(cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set (``{"data.batch_size": 8}``)."""
    out = cfg.copy()
    with open_dict(out):
        for key, value in values.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


# ----------------------------------------------------------------------------------------------------
# Mode: train
# ----------------------------------------------------------------------------------------------------


class StepTimer(pl.Callback):
    """Times Lightning training steps after a warm-up.

    ``warmup`` batches are not timed; then ``repeats`` samples of ``steps_per_repeat`` batches each: a sample
    is the wall time from the end of the batch before it to the end of its last batch (data loading, forward,
    backward, optimizer step, Lightning's bookkeeping), with the device synchronised at the sample boundaries
    only. With ``count_syncs`` (and ``warmup >= 2``) one whole loop iteration before the timed part (end of
    batch ``warmup-2`` to end of batch ``warmup-1``) runs under
    :class:`~ssd_lightning.fastpath.HostSyncCounter`.

    After ``fit``: ``sample_seconds`` (this rank's), ``images_per_step`` (this rank's batch), ``memory``,
    ``syncs`` (dict or None) and, on every rank, ``all_sample_seconds`` (one list per rank).
    """

    def __init__(
        self, warmup: int, repeats: int, steps_per_repeat: int, device: torch.device, count_syncs: bool = True
    ) -> None:
        self.warmup = int(warmup)
        self.repeats = int(repeats)
        self.steps_per_repeat = int(steps_per_repeat)
        self.device = device
        self.count_syncs = bool(count_syncs) and self.warmup >= 2
        self.sample_seconds: list[float] = []
        self.all_sample_seconds: list[list[float]] = []
        self.images_per_step = 0
        self.memory: dict[str, Any] = {}
        self.all_memory: list[dict[str, Any]] = []
        self.syncs: dict[str, int] | None = None
        self._steps = 0
        self._last: float | None = None
        self._counter: HostSyncCounter | None = None
        self._peak = PeakMemory(device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # this rank's device (the one given to __init__ is resolved before Lightning picks the rank's GPU)
        self.device = pl_module.device
        self._peak = PeakMemory(self.device)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.repeats * self.steps_per_repeat

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ):
        self._steps += 1
        step = self._steps
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.syncs = dict(self._counter.where)
            self._counter = None
        if self.count_syncs and step == self.warmup - 1:
            self._counter = HostSyncCounter(trace=True, host_reads=self.device.type == "cpu")
            self._counter.__enter__()
        if step == self.warmup:
            _sync(self.device)
            self._peak.reset()
            self.images_per_step = int(batch["images"].shape[0])
            self._last = time.perf_counter()
        elif (
            step > self.warmup
            and (step - self.warmup) % self.steps_per_repeat == 0
            and self._last is not None
        ):
            _sync(self.device)
            now = time.perf_counter()
            self.sample_seconds.append(now - self._last)
            self._last = now
            if len(self.sample_seconds) == self.repeats:
                self.memory = self._peak.read()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.sample_seconds, self.memory))
            self.all_sample_seconds = [g[0] for g in gathered]
            self.all_memory = [g[1] for g in gathered]
        else:
            self.all_sample_seconds = [self.sample_seconds]
            self.all_memory = [self.memory]


def _bench_train(cfg: DictConfig, settings: dict[str, Any], batch_size: int) -> tuple[dict[str, Any], bool]:
    """One training run at ``batch_size`` per device; returns (record, is_global_zero)."""
    from ssd_lightning import cli

    bench, fast = settings["benchmark"], settings["fastpath"]
    cfg = _with(cfg, **{"data.batch_size": batch_size, "model.channels_last": bool(fast["channels_last"])})
    seed = pl.seed_everything(cfg.get("seed") if cfg.get("seed") is not None else 0, workers=True)
    if bench["input"] == "synthetic":
        datamodule = None
        module = cli.instantiate_module(cfg, _classes_without_data(cfg, bench), backbone_weights=None)
    else:
        cli.prepare_synthetic(cfg)
        datamodule = cli.build_datamodule(cfg, seed)
        module = cli.build_module(cfg, datamodule)
    device = resolve_device(cfg.trainer.get("accelerator"))
    # the counter's dispatch mode would slow the compiled graph down and show up in torch.profiler's table
    count_syncs = bool(bench.get("count_syncs", True)) and not (
        fast["compile"] or fast["compile_loss"] or bench.get("profiler") == "pytorch"
    )
    timer = StepTimer(bench["warmup"], bench["repeats"], bench["steps_per_repeat"], device, count_syncs)
    callbacks = [
        FastPathCallback(
            compile=fast["compile"],
            compile_loss=fast["compile_loss"],
            compile_mode=fast["compile_mode"],
            optimizer=fast["optimizer"],
            cudnn_benchmark=fast["cudnn_benchmark"],
            matmul_precision=fast["matmul_precision"],
        ),
        timer,
    ]
    import hydra

    trainer = hydra.utils.instantiate(
        cfg.trainer,
        _convert_="all",
        callbacks=callbacks,
        logger=False,
        max_steps=timer.total_steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        benchmark=fast["cudnn_benchmark"],
        profiler=_profiler(bench.get("profiler"), Path(cfg.paths.output_dir), batch_size, device),
    )
    with cli._JobScope():
        if datamodule is None:
            trainer.fit(module, train_dataloaders=DeviceBatches(module, batch_size, timer.total_steps))
        else:
            trainer.fit(module, datamodule=datamodule)
    if trainer.global_step < timer.total_steps or len(timer.sample_seconds) < bench["repeats"]:
        raise ConfigError(
            f"training stopped after {trainer.global_step} of {timer.total_steps} steps; lower "
            "benchmark.warmup/repeats/steps_per_repeat or check trainer.max_time / accumulate_grad_batches=1"
        )
    world = trainer.world_size
    images_per_sample = timer.images_per_step * world * timer.steps_per_repeat
    # DDP steps are lock-stepped by the gradient all-reduce: a sample lasts as long as its slowest rank
    seconds = [max(s) for s in zip(*timer.all_sample_seconds, strict=True)]
    record = {
        "mode": "train",
        "batch_size": batch_size,
        "global_batch_size": batch_size * world * int(trainer.accumulate_grad_batches),
        "world_size": world,
        "device": str(trainer.strategy.root_device),
        "strategy": type(trainer.strategy).__name__,
        "precision": str(trainer.precision),
        "input": bench["input"],
        "data_device": getattr(datamodule, "_runtime", {}).get("decode")
        if getattr(datamodule, "_runtime", None)
        else None,
        "steps": {"warmup": timer.warmup, "timed": timer.repeats * timer.steps_per_repeat},
        "images_per_s": summarize([images_per_sample / s for s in seconds]),
        "step_ms": summarize([1000 * s / timer.steps_per_repeat for s in seconds]),
        "memory": timer.all_memory[0] if timer.all_memory else timer.memory,
        "memory_per_rank": timer.all_memory,
        "host_syncs_per_step": timer.syncs if count_syncs else None,
    }
    if bench.get("profiler"):
        record["profile"] = _profile_summary(trainer.profiler)
    return record, trainer.is_global_zero


def _profiler(kind: str | None, out_dir: Path, batch_size: int, device: torch.device) -> Any:
    """Lightning's ``simple`` profiler (host time per loop action: how long each step waited for its batch)
    or ``pytorch`` (``torch.profiler``: operators and kernels), reporting to
    ``<run dir>/fit-profile_b<N>.txt``; None: no profiler."""
    if kind is None:
        return None
    from pytorch_lightning.profilers import PyTorchProfiler, SimpleProfiler

    name = f"profile_b{batch_size}"
    if kind == "simple":
        return SimpleProfiler(dirpath=out_dir, filename=name)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return PyTorchProfiler(dirpath=out_dir, filename=name, sort_by_key=key, row_limit=30)


def _profile_summary(profiler: Any) -> dict[str, Any]:
    """The report file and, from the ``simple`` profiler, the median host time per step spent waiting for the
    batch (``train_dataloader_next``) and running it (``run_training_batch``; on a GPU the launch time, since
    the device is not synchronised inside a sample), and the waiting share."""
    summary: dict[str, Any] = {"file": str(Path(profiler.dirpath) / f"fit-{profiler.filename}.txt")}
    durations = getattr(profiler, "recorded_durations", None)
    if durations:
        wait = durations.get("[_TrainingEpochLoop].train_dataloader_next") or []
        run = durations.get("run_training_batch") or []
        if wait and run:
            summary["data_wait_ms_median"] = 1000 * statistics.median(wait)
            summary["training_batch_ms_median"] = 1000 * statistics.median(run)
            summary["data_wait_share"] = sum(wait) / (sum(wait) + sum(run))
    return summary


def _classes_without_data(cfg: DictConfig, bench: dict[str, Any]) -> int:
    """Classes of a network built without a data set: ``model.num_classes``, else ``benchmark.num_classes``
    (81 unless set)."""
    return int(cfg.model.get("num_classes") or bench.get("num_classes") or 81)


class DeviceBatches:
    """``steps`` training batches made once on the module's device and yielded again and again: what
    ``COCODataModule`` yields (``images`` [N, 3, 300, 300] float32, ``boxes`` [N, 8732, 4] xywh, ``labels``
    [N, 8732] int64), without decoding or augmentation. About 1 % of the default boxes are positives with a
    random class and a box near the default box; the loss costs the same whatever the values.
    """

    def __init__(self, module: pl.LightningModule, batch_size: int, steps: int) -> None:
        self.module = module
        self.batch_size = int(batch_size)
        self.steps = int(steps)
        self._batch: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.steps

    def _make(self, device: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(0)
        anchors = self.module.model.default_boxes.xywh  # [A, 4]
        n, a = self.batch_size, anchors.shape[0]
        positive = torch.rand(n, a, generator=g) < 0.01
        classes = int(self.module.hparams.num_classes)
        labels = torch.randint(1, classes, (n, a), generator=g) * positive
        jitter = 1 + 0.1 * torch.randn(n, a, 4, generator=g)
        boxes = torch.where(positive[..., None], anchors * jitter, anchors)
        images = torch.randn(n, 3, 300, 300, generator=g)
        return {"images": images.to(device), "boxes": boxes.to(device), "labels": labels.to(device)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._batch is None:  # iterated once Lightning has put the module on its device
            self._batch = self._make(self.module.device)
        for _ in range(self.steps):
            yield self._batch


# ----------------------------------------------------------------------------------------------------
# Mode: inference
# ----------------------------------------------------------------------------------------------------


def _inference_model(cfg: DictConfig, bench: dict[str, Any]) -> torch.nn.Module:
    from ssd_lightning.model import SSD300

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        from ssd_lightning.checkpoints import load_model

        return load_model(str(ckpt_path))
    torch.manual_seed(int(cfg.get("seed") or 0))
    return SSD300(str(cfg.model.backbone), _classes_without_data(cfg, bench), backbone_weights=None).eval()


def _batches_forever(loader: Any) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("the data loader yielded no batch; check data.root and the batch size")


def _bench_inference(cfg: DictConfig, settings: dict[str, Any], batch_size: int) -> dict[str, Any]:
    bench, fast = settings["benchmark"], settings["fastpath"]
    device = resolve_device(cfg.trainer.get("accelerator"))
    autocast_dtype, param_dtype = precision_settings(cfg.trainer.get("precision", "32-true"), device)
    set_backend_flags(fast["cudnn_benchmark"] if device.type == "cuda" else None, fast["matmul_precision"])
    model = _inference_model(cfg, bench).to(device=device, dtype=param_dtype).eval()
    memory_format = torch.channels_last if fast["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if fast["compile"]:
        compile_module(model, fast["compile_mode"])
    post = functools.partial(postprocess, nms_method=fast["nms_method"])
    boxes = model._default_boxes_on(device)
    hp = cfg.model
    post_kwargs = {
        "score_threshold": float(hp.get("score_threshold", 0.05)),
        "iou_threshold": float(hp.get("nms_iou_threshold", 0.5)),
        "max_detections": int(hp.get("max_detections", 200)),
        "candidates_per_class": int(hp.get("candidates_per_class", 200)),
    }

    if bench["input"] == "dali":
        datamodule = _datamodule_for(cfg, device, batch_size)
        datamodule.setup("validate")
        source = _batches_forever(datamodule.val_dataloader())

        def next_images() -> torch.Tensor:
            return next(source)["images"]
    else:
        g = torch.Generator(device="cpu").manual_seed(0)
        pool = [torch.randn(batch_size, 3, 300, 300, generator=g).to(device) for _ in range(2)]
        counter = iter(range(10**12))

        def next_images() -> torch.Tensor:
            return pool[next(counter) % 2]

    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=autocast_dtype))
        if autocast_dtype is not None
        else contextlib.nullcontext
    )

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(device=device, dtype=param_dtype, non_blocking=True)
        images = images.contiguous(memory_format=memory_format)
        with autocast():
            return model(images)

    def step() -> list[dict[str, torch.Tensor]]:
        with torch.inference_mode():
            locs, confs = forward(next_images())
            return post(locs, confs, boxes, **post_kwargs)

    compile_seconds = None
    t0 = time.perf_counter()
    for _ in range(bench["warmup"]):
        step()
    _sync(device)
    if fast["compile"]:
        compile_seconds = time.perf_counter() - t0

    peak = PeakMemory(device)
    peak.reset()
    latencies: list[float] = []
    samples: list[float] = []
    detections = 0
    for _ in range(bench["repeats"]):
        sample = 0.0
        for _ in range(bench["steps_per_repeat"]):
            _sync(device)
            t = time.perf_counter()
            out = step()
            _sync(device)
            dt = time.perf_counter() - t
            latencies.append(dt)
            sample += dt
            detections += sum(int(d["scores"].numel()) for d in out)
        samples.append(sample)
    memory = peak.read()
    timed = bench["repeats"] * bench["steps_per_repeat"]
    record: dict[str, Any] = {
        "mode": "inference",
        "input": bench["input"],
        "batch_size": batch_size,
        "device": str(device),
        "precision": str(cfg.trainer.get("precision", "32-true")),
        "backbone": getattr(model, "backbone_name", None),
        "num_classes": getattr(model, "num_classes", None),
        "weights": str(cfg.get("ckpt_path")) if cfg.get("ckpt_path") else "random",
        "postprocess": f"nms_method={fast['nms_method']}",
        "steps": {"warmup": bench["warmup"], "timed": timed},
        "images_per_s": summarize([batch_size * bench["steps_per_repeat"] / s for s in samples]),
        "latency_ms": {
            "p50": 1000 * percentile(latencies, 50),
            "p99": 1000 * percentile(latencies, 99),
            "mean": 1000 * statistics.fmean(latencies),
            "min": 1000 * min(latencies),
            "max": 1000 * max(latencies),
        },
        "detections_per_image": detections / (timed * batch_size),
        "memory": memory,
        "compile_seconds": compile_seconds,
    }
    if bench.get("breakdown", True):
        images = next_images()
        forward_ms, post_ms = [], []
        with torch.inference_mode():
            for _ in range(max(3, min(timed, 20))):
                _sync(device)
                t = time.perf_counter()
                locs, confs = forward(images)
                _sync(device)
                forward_ms.append(1000 * (time.perf_counter() - t))
                t = time.perf_counter()
                post(locs, confs, boxes, **post_kwargs)
                _sync(device)
                post_ms.append(1000 * (time.perf_counter() - t))
            scores = confs.float().softmax(dim=1)[:, 1:]
            candidates = float((scores > post_kwargs["score_threshold"]).sum()) / images.shape[0]
        record["breakdown_ms"] = {
            "network_p50": percentile(forward_ms, 50),
            "postprocess_p50": percentile(post_ms, 50),
            "network_images_per_s": 1000 * batch_size / percentile(forward_ms, 50),
            "class_scores_above_threshold_per_image": candidates,
        }
    return record


# ----------------------------------------------------------------------------------------------------
# Mode: data
# ----------------------------------------------------------------------------------------------------


def _datamodule_for(cfg: DictConfig, device: torch.device, batch_size: int) -> Any:
    """The configured data module, on ``device`` (``data.device=auto`` follows it), at ``batch_size``."""
    from ssd_lightning import cli

    values: dict[str, Any] = {"data.batch_size": batch_size, "data.val_batch_size": batch_size}
    if str(cfg.data.get("device", "auto")).lower() == "auto":
        values["data.device"] = "gpu" if device.type == "cuda" else "cpu"
    cfg = _with(cfg, **values)
    seed = int(cfg.get("seed") or 0)
    cli.prepare_synthetic(cfg)
    datamodule = cli.build_datamodule(cfg, seed)
    if getattr(datamodule, "precision", "unset") is None:
        datamodule.precision = str(cfg.trainer.get("precision", "32-true"))
    return datamodule


def _bench_data(cfg: DictConfig, settings: dict[str, Any], batch_size: int, split: str) -> dict[str, Any]:
    bench = settings["benchmark"]
    device = resolve_device(cfg.trainer.get("accelerator"))
    datamodule = _datamodule_for(cfg, device, batch_size)
    datamodule.setup("fit" if split == "train" else "validate")
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    batches = _batches_forever(loader)
    for _ in range(bench["warmup"]):
        next(batches)
    peak = PeakMemory(device)
    peak.reset()
    rates, seconds = [], []
    for _ in range(bench["repeats"]):
        _sync(device)
        t = time.perf_counter()
        images = 0
        for _ in range(bench["steps_per_repeat"]):
            images += int(next(batches)["images"].shape[0])
        _sync(device)
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


# ----------------------------------------------------------------------------------------------------
# Mode: eval
# ----------------------------------------------------------------------------------------------------


def synthetic_coco_results(
    num_images: int, objects_per_image: float, detections_per_image: int, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A COCO ground truth (80 categories with COCO's ids, images 300-640 px, small/medium/large boxes, 1%
    crowd) and ``detections_per_image`` result rows per image (3 noisy copies of each object, 80% with the
    right class, then random boxes), the shape of SSD300's output on COCO val2017."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cat_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    images, annotations, rows = [], [], []

    def random_boxes(n: int, w: int, h: int):
        side = np.exp(rng.uniform(np.log(6), np.log(0.9 * min(w, h)), size=(n, 1)))
        wh = np.minimum(side * np.exp(rng.normal(0, 0.35, size=(n, 2))), [w, h])
        xy = rng.uniform(0, 1, size=(n, 2)) * ([w, h] - wh)
        return np.concatenate([xy, wh], axis=1)

    for image_id in range(1, num_images + 1):
        w, h = int(rng.integers(300, 641)), int(rng.integers(300, 641))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
        n = int(rng.poisson(objects_per_image))
        gt = random_boxes(n, w, h)
        gt_cats = rng.choice(cat_ids, size=n)
        crowd = rng.random(n) < 0.01
        for box, cat, is_crowd in zip(gt.tolist(), gt_cats.tolist(), crowd.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(is_crowd),
                }
            )
        copies = np.repeat(np.arange(n), 3)[:detections_per_image]
        noisy = gt[copies] + rng.normal(0, 0.08, size=(len(copies), 4)) * np.tile(gt[copies, 2:], 2)
        noisy[:, 2:] = np.maximum(noisy[:, 2:], 1.0)
        noisy_cats = np.where(
            rng.random(len(copies)) < 0.8, gt_cats[copies], rng.choice(cat_ids, len(copies))
        )
        k = detections_per_image - len(copies)
        boxes = np.concatenate([noisy, random_boxes(k, w, h)])
        cats = np.concatenate([noisy_cats, rng.choice(cat_ids, size=k)]).astype(np.int64)
        scores = np.concatenate([rng.beta(4, 2, len(copies)), rng.beta(2, 4, k)])
        rows.extend(
            {"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
            for c, b, s in zip(cats.tolist(), boxes.tolist(), scores.tolist(), strict=True)
        )
    categories = [{"id": c, "name": f"class{c}"} for c in cat_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, rows


def _bench_eval(cfg: DictConfig, settings: dict[str, Any]) -> list[dict[str, Any]]:
    from ssd_lightning.evaluation import BACKENDS, evaluate_detections, load_annotations

    bench = settings["benchmark"]
    ev = bench.get("eval") or {}
    num_images = int(ev.get("images", 5000))
    per_image = int(ev.get("detections_per_image", 100))
    backends = list(ev.get("backends") or ["faster_coco_eval"])
    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"benchmark.eval.backends: {backend!r} is not one of {', '.join(BACKENDS)}")
    t = time.perf_counter()
    gt, rows = synthetic_coco_results(
        num_images, float(ev.get("objects_per_image", 7)), per_image, int(cfg.get("seed") or 0)
    )
    build_seconds = time.perf_counter() - t
    records, stats = [], {}
    device = torch.device("cpu")
    for backend in backends:
        coco_gt = load_annotations(gt, backend)
        for _ in range(bench["warmup"]):
            evaluate_detections(coco_gt, rows, backend=backend)
        peak = PeakMemory(device)
        peak.reset()
        seconds = []
        for _ in range(bench["repeats"]):
            t = time.perf_counter()
            metrics = evaluate_detections(coco_gt, rows, backend=backend)
            seconds.append(time.perf_counter() - t)
        stats[backend] = metrics
        records.append(
            {
                "mode": "eval",
                "backend": backend,
                "batch_size": num_images,
                "images": num_images,
                "detections": len(rows),
                "device": "cpu",
                "steps": {"warmup": bench["warmup"], "timed": bench["repeats"]},
                "seconds": summarize(seconds),
                "images_per_s": summarize([num_images / s for s in seconds]),
                "metrics": metrics,
                "memory": peak.read(),
                "data_build_seconds": build_seconds,
            }
        )
    if len(stats) > 1:
        first = next(iter(stats.values()))
        diff = max(abs(m[k] - first[k]) for m in stats.values() for k in first)
        base = records[-1]["seconds"]["median"]
        for record in records:
            record["max_metric_difference_between_backends"] = diff
            record["speedup_vs_" + records[-1]["backend"]] = base / record["seconds"]["median"]
    return records


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return "-"


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def format_results(result: dict[str, Any]) -> str:
    """The runs of a result as a Markdown table (plus the machine line)."""
    m = result["machine"]
    load = result.get("load_average", {})
    head = (
        f"benchmark mode={result['mode']} on {m.get('device_name')} ({m.get('device')}; "
        f"{m.get('cpu_count')} CPUs, {m.get('torch_threads')} torch threads); "
        f"load average before {load.get('before')}, after {load.get('after')}"
    )
    lines = [
        head,
        "| run | batch | device | precision | images/s (median) | min - max | p50 ms | p99 ms | peak mem |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for r in result["runs"]:
        ips = r["images_per_s"]
        name = r["mode"]
        if r["mode"] == "train":
            source = "synthetic" if r.get("input") == "synthetic" else r.get("data_device") or "?"
            name += f" x{r['world_size']} ({source} data)"
        elif r["mode"] == "data":
            name += f" {r['split']} ({r.get('data_device')}, {r.get('num_threads')} threads)"
        elif r["mode"] == "eval":
            name += f" {r['backend']}"
        elif r["mode"] == "inference":
            name += f" {r['input']} ({r['postprocess']})"
        lat = r.get("latency_ms") or {}
        mem = r.get("memory") or {}
        peak = mem.get("device_max_allocated_bytes", mem.get("peak_rss_bytes"))
        lines.append(
            f"| {name} | {r['batch_size']} | {r.get('device', '-')} | {r.get('precision', '-')} | "
            f"{ips['median']:.1f} | {ips.get('min', nan):.1f} - {ips.get('max', nan):.1f} | "
            f"{_ms(lat.get('p50'))} | {_ms(lat.get('p99'))} | {_bytes(peak)} |"
        )
    return "\n".join(lines)


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.mode``; print the table and write ``benchmark.json`` (rank 0). Returns the result dict."""
    from ssd_lightning import cli
    from ssd_lightning.evaluation import write_json_atomic

    mode = str(cfg.get("mode"))
    if mode not in MODES:
        raise ConfigError(f"mode={cfg.get('mode')}: use mode=train, inference, data or eval")
    settings = _settings(cfg)
    bench = settings["benchmark"]
    if bench.get("threads"):
        torch.set_num_threads(int(bench["threads"]))
    device = torch.device("cpu") if mode == "eval" else resolve_device(cfg.trainer.get("accelerator"))
    devices = cfg.trainer.get("devices", 1)
    if mode != "train" and str(devices) not in ("1", "auto") and devices != 1:
        log.warning(
            "mode=%s runs on one device; trainer.devices=%s is used by mode=train only", mode, devices
        )
    if mode == "train":
        cli.install_ddp_sweep_support()
    load_before = _load_average()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    runs: list[dict[str, Any]] = []
    is_zero = True
    for batch_size in bench["batch_sizes"] if mode != "eval" else [None]:
        if mode == "train":
            record, is_zero = _bench_train(cfg, settings, batch_size)
            runs.append(record)
        elif mode == "inference":
            runs.append(_bench_inference(cfg, settings, batch_size))
        elif mode == "data":
            for split in bench.get("splits") or ["train"]:
                if split not in ("train", "val"):
                    raise ConfigError(f"benchmark.splits: {split!r}; use train and/or val")
                runs.append(_bench_data(cfg, settings, batch_size, split))
        else:
            runs.extend(_bench_eval(cfg, settings))
    result = {
        "mode": mode,
        "started": started,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "overrides": _task_overrides(),
        "machine": machine_info(device),
        "load_average": {"before": load_before, "after": _load_average()},
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


def _task_overrides() -> list[str]:
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    return []
