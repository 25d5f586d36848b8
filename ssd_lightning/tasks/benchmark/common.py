"""What every benchmark mode shares: settings, timing statistics, peak memory, machine facts, the table.

Images/s is reported as the median and the spread over ``benchmark.repeats`` samples; memory as the peak
device memory (CUDA) or the peak RSS of the process during the timed part (CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf, open_dict

from ssd_lightning.errors import ConfigError
from ssd_lightning.postprocess import POSTPROCESS_NMS_METHODS
from ssd_lightning.runtime.builders import build_datamodule, prepare_synthetic
from ssd_lightning.training.fastpath import (
    OPTIMIZER_IMPLS,
)

MODES: tuple[str, ...] = ("train", "inference", "data", "eval")


RESULTS_FILE = "benchmark.json"


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


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures come from: CPU, cores, threads, accelerator, library versions."""

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
        import nvidia.dali  # lazy: DALI's version when it is installed (the GPU machine may lack it)

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
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_bytes"] = int(hwm) * 1024
        out["peak_rss_scope"] = "timed part" if self.rss_reset else "process lifetime"
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def benchmark_settings(cfg: DictConfig) -> dict[str, Any]:
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


def with_values(cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set (``{"data.batch_size": 8}``)."""
    out = cfg.copy()
    with open_dict(out):
        for key, value in values.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


def format_binary_bytes(n: Any) -> str:
    """Bytes in binary units for the benchmark table (``1.50 GiB``; ``-`` when unknown); messages to users
    use :func:`ssd_lightning.fileio.format_bytes` (decimal, as ``df -H``)."""
    if not isinstance(n, (int, float)) or n <= 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return "-"


def format_ms(value: Any) -> str:
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
            f"{format_ms(lat.get('p50'))} | {format_ms(lat.get('p99'))} | {format_binary_bytes(peak)} |"
        )
    return "\n".join(lines)


def batches_forever(loader: Any) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("the data loader yielded no batch; check data.root and the batch size")


def datamodule_for(cfg: DictConfig, device: torch.device, batch_size: int) -> Any:
    """The configured data module, on ``device`` (``data.device=auto`` follows it), at ``batch_size``."""

    values: dict[str, Any] = {"data.batch_size": batch_size, "data.val_batch_size": batch_size}
    if str(cfg.data.get("device", "auto")).lower() == "auto":
        values["data.device"] = "gpu" if device.type == "cuda" else "cpu"
    cfg = with_values(cfg, **values)
    seed = int(cfg.get("seed") or 0)
    prepare_synthetic(cfg)
    datamodule = build_datamodule(cfg, seed)
    if getattr(datamodule, "precision", "unset") is None:
        datamodule.precision = str(cfg.trainer.get("precision", "32-true"))
    return datamodule


def classes_without_data(cfg: DictConfig, bench: dict[str, Any]) -> int:
    """Classes of a network built without a data set: ``model.num_classes``, else ``benchmark.num_classes``
    (81 unless set)."""
    return int(cfg.model.get("num_classes") or bench.get("num_classes") or 81)
