"""``benchmark.py mode=train``: the loop ``train.py`` runs, timed between batch ends.

Built as ``train.py`` builds it (:mod:`ssd_lightning.runtime.builders`: data module, module, the configured
callbacks with the fast-path switches, the Trainer of ``cfg.trainer``), without loggers and, unless
``benchmark.validate``, without validation; ``benchmark.steps_per_epoch`` makes it cross epoch boundaries.
:class:`StepTimer` synchronises the device only at sample boundaries; :class:`LoopTimer` measures the data
wait and the epoch-boundary gap. ``benchmark.input=synthetic`` feeds one batch made on the device
(:class:`DeviceBatches`) instead of DALI: the model, loss and optimizer alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from pytorch_lightning.profilers import PyTorchProfiler, SimpleProfiler

from ssd_lightning.errors import ConfigError
from ssd_lightning.runtime.builders import (
    build_datamodule,
    build_module,
    build_trainer,
    instantiate_callbacks,
    instantiate_module,
    prepare_synthetic,
)
from ssd_lightning.runtime.ddp_sweeps import JobScope
from ssd_lightning.runtime.devices import resolve_device
from ssd_lightning.tasks.benchmark.common import (
    PeakMemory,
    classes_without_data,
    summarize,
    synchronize,
    with_values,
)
from ssd_lightning.training.fastpath import HostSyncCounter


class StepTimer(pl.Callback):
    """Times Lightning training steps after a warm-up.

    ``warmup`` batches are not timed; then ``repeats`` samples of ``steps_per_repeat`` batches each: a sample
    is the wall time from the end of the batch before it to the end of its last batch (data loading, forward,
    backward, optimizer step, Lightning's bookkeeping), with the device synchronised at the sample boundaries
    only. With ``count_syncs`` (and ``warmup >= 2``) one whole loop iteration before the timed part (end of
    batch ``warmup-2`` to end of batch ``warmup-1``) runs under
    :class:`~ssd_lightning.training.fastpath.HostSyncCounter`.

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
        self.blocking: int | None = None
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
            self.blocking = self._counter.blocking
            self._counter = None
        if self.count_syncs and step == self.warmup - 1:
            self._counter = HostSyncCounter(trace=True, host_reads=self.device.type == "cpu")
            self._counter.__enter__()
        if step == self.warmup:
            synchronize(self.device)
            self._peak.reset()
            self.images_per_step = int(batch["images"].shape[0])
            self._last = time.perf_counter()
        elif (
            step > self.warmup
            and (step - self.warmup) % self.steps_per_repeat == 0
            and self._last is not None
        ):
            synchronize(self.device)
            now = time.perf_counter()
            self.sample_seconds.append(now - self._last)
            self._last = now
            if len(self.sample_seconds) == self.repeats:
                self.memory = self._peak.read()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.sample_seconds, self.memory))
            self.all_sample_seconds = [g[0] for g in gathered]
            self.all_memory = [g[1] for g in gathered]
        else:
            self.all_sample_seconds = [self.sample_seconds]
            self.all_memory = [self.memory]


class LoopTimer(pl.Callback):
    """The host's view of the training loop: how long each step waited for its batch, and the gap at each
    epoch boundary.

    * data wait: from the end of one training batch to the start of the next inside an epoch (Lightning
      fetching the batch from the loader, plus its bookkeeping); ``data_wait_share`` is its part of the time
      from the first measured batch end to the last.
    * epoch-boundary gap: from the end of an epoch's last batch (the device synchronised) to the start of the
      next epoch's first batch: the epoch-end callbacks (checkpoints), validation when it runs, the loader's
      new epoch and its first batch.

    The first ``warmup`` batches are left out of the data wait.
    """

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup = int(warmup)
        self.device = device
        self.waits: list[float] = []
        self.busy: list[float] = []
        self.gaps: list[float] = []
        #: peak memory at each epoch's end (CUDA: since the timed part began; CPU: peak RSS)
        self.epoch_memory: list[dict[str, Any]] = []
        self._batches = 0
        self._end: float | None = None
        self._start: float | None = None
        self._epoch_over = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.device = pl_module.device

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._end is not None:
            if self._epoch_over:
                self.gaps.append(now - self._end)
            elif self._batches > self.warmup:
                self.waits.append(now - self._end)
        self._epoch_over = False
        self._start = now

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self._batches += 1
        last = i + 1 >= trainer.num_training_batches
        if last:
            synchronize(self.device)  # the boundary starts when the device has finished the epoch's work
            self.epoch_memory.append(PeakMemory(self.device).read())
        now = time.perf_counter()
        if self._start is not None and self._batches > self.warmup:
            self.busy.append(now - self._start)
        self._end = now
        self._epoch_over = last

    def summary(self) -> dict[str, Any]:
        wait, busy = sum(self.waits), sum(self.busy)
        return {
            "data_wait_ms": summarize([1000 * w for w in self.waits]),
            "data_wait_share": wait / (wait + busy) if wait + busy > 0 else None,
            "epoch_boundary_gap_s": [round(g, 4) for g in self.gaps],
            "epoch_memory": self.epoch_memory,
        }


def bench_train(cfg: DictConfig, settings: dict[str, Any], batch_size: int) -> tuple[dict[str, Any], bool]:
    """One training run at ``batch_size`` per device; returns (record, is_global_zero)."""

    bench, fast = settings["benchmark"], settings["fastpath"]
    cfg = with_values(
        cfg,
        **{
            "data.batch_size": batch_size,
            "model.channels_last": bool(fast["channels_last"]),
            # the benchmark's switches are train.py's callbacks.fastpath (one FastPathCallback)
            **{f"callbacks.fastpath.{k}": fast[k] for k in FASTPATH_CALLBACK_KEYS},
        },
    )
    seed = pl.seed_everything(cfg.get("seed") if cfg.get("seed") is not None else 0, workers=True)
    if bench["input"] == "synthetic":
        datamodule = None
        module = instantiate_module(cfg, classes_without_data(cfg, bench), backbone_weights=None)
    else:
        prepare_synthetic(cfg)
        datamodule = build_datamodule(cfg, seed)
        module = build_module(cfg, datamodule)
    device = resolve_device(cfg.trainer.get("accelerator"), "trainer.accelerator")
    # the counter's dispatch mode would slow the compiled graph down and show up in torch.profiler's table
    count_syncs = bool(bench.get("count_syncs", True)) and not (
        fast["compile"] or fast["compile_loss"] or bench.get("profiler") == "pytorch"
    )
    timer = StepTimer(bench["warmup"], bench["repeats"], bench["steps_per_repeat"], device, count_syncs)
    loop = LoopTimer(bench["warmup"], device)
    callbacks = [*instantiate_callbacks(cfg, have_logger=False), loop, timer]  # train.py's, then the timers
    overrides: dict[str, Any] = {
        "max_steps": timer.total_steps,
        "max_epochs": -1,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
        "profiler": _profiler(bench.get("profiler"), Path(cfg.paths.output_dir), batch_size, device),
    }
    if not bench.get("validate"):
        overrides["limit_val_batches"] = 0
    if bench.get("steps_per_epoch"):
        overrides["limit_train_batches"] = int(bench["steps_per_epoch"])
    if fast.get("cudnn_benchmark") is not None:
        overrides["benchmark"] = bool(fast["cudnn_benchmark"])
    trainer = build_trainer(cfg, callbacks, [], **overrides)
    with JobScope():
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
        "blocking_host_syncs_per_step": timer.blocking if count_syncs else None,
        "epochs": len(loop.gaps) + 1,  # the epochs the timed run touched
        **loop.summary(),
    }
    if bench.get("profiler"):
        record["profile"] = _profile_summary(trainer.profiler, type(trainer.fit_loop.epoch_loop).__name__)
    return record, trainer.is_global_zero


#: the keys of ``fastpath.*`` (conf/benchmark.yaml) that are train.py's ``callbacks.fastpath.*``
FASTPATH_CALLBACK_KEYS = ("compile", "compile_loss", "compile_mode", "optimizer", "matmul_precision")


def _profiler(kind: str | None, out_dir: Path, batch_size: int, device: torch.device) -> Any:
    """Lightning's ``simple`` profiler (host time per loop action: how long each step waited for its batch)
    or ``pytorch`` (``torch.profiler``: operators and kernels), reporting to
    ``<run dir>/fit-profile_b<N>.txt``; None: no profiler."""
    if kind is None:
        return None

    name = f"profile_b{batch_size}"
    if kind == "simple":
        return SimpleProfiler(dirpath=out_dir, filename=name)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return PyTorchProfiler(dirpath=out_dir, filename=name, sort_by_key=key, row_limit=30)


def _profile_summary(profiler: Any, epoch_loop: str) -> dict[str, Any]:
    """The report file and, from the ``simple`` profiler, the median host time per step spent waiting for the
    batch (``[<epoch_loop>].train_dataloader_next``, ``epoch_loop`` the loop's class name) and running it
    (``run_training_batch``; on a GPU the launch time, since the device is not synchronised inside a sample),
    and the waiting share."""
    summary: dict[str, Any] = {"file": str(Path(profiler.dirpath) / f"fit-{profiler.filename}.txt")}
    durations = getattr(profiler, "recorded_durations", None)
    if durations:
        wait = durations.get(f"[{epoch_loop}].train_dataloader_next") or []
        run = durations.get("run_training_batch") or []
        if wait and run:
            summary["data_wait_ms_median"] = 1000 * statistics.median(wait)
            summary["training_batch_ms_median"] = 1000 * statistics.median(run)
            summary["data_wait_share"] = sum(wait) / (sum(wait) + sum(run))
    return summary


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
