"""``benchmark.py mode=inference``: input on the device to detections (network + decode + NMS + top-k).

One synchronised latency per batch: p50/p99 latency and images/s; ``benchmark.input=synthetic`` (random
images on the device) or ``dali`` (batches of the validation pipeline, loading included).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from typing import Any

import torch
from omegaconf import DictConfig

from ssd_lightning.checkpoints import load_model
from ssd_lightning.model import SSD300
from ssd_lightning.postprocess import postprocess
from ssd_lightning.runtime.devices import resolve_device
from ssd_lightning.tasks.benchmark.common import (
    PeakMemory,
    batches_forever,
    classes_without_data,
    datamodule_for,
    percentile,
    precision_settings,
    summarize,
    synchronize,
)
from ssd_lightning.training.fastpath import (
    compile_module,
    set_backend_flags,
)


def _inference_model(cfg: DictConfig, bench: dict[str, Any]) -> torch.nn.Module:

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        return load_model(str(ckpt_path))
    torch.manual_seed(int(cfg.get("seed") or 0))
    return SSD300(str(cfg.model.backbone), classes_without_data(cfg, bench), backbone_weights=None).eval()


def bench_inference(cfg: DictConfig, settings: dict[str, Any], batch_size: int) -> dict[str, Any]:
    bench, fast = settings["benchmark"], settings["fastpath"]
    device = resolve_device(cfg.trainer.get("accelerator"), "trainer.accelerator")
    autocast_dtype, param_dtype = precision_settings(cfg.trainer.get("precision", "32-true"), device)
    cudnn = fast["cudnn_benchmark"] if fast["cudnn_benchmark"] is not None else True  # null: on for CUDA
    set_backend_flags(cudnn if device.type == "cuda" else None, fast["matmul_precision"])
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
        datamodule = datamodule_for(cfg, device, batch_size)
        datamodule.setup("validate")
        source = batches_forever(datamodule.val_dataloader())

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
    synchronize(device)
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
            synchronize(device)
            t = time.perf_counter()
            out = step()
            synchronize(device)
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
                synchronize(device)
                t = time.perf_counter()
                locs, confs = forward(images)
                synchronize(device)
                forward_ms.append(1000 * (time.perf_counter() - t))
                t = time.perf_counter()
                post(locs, confs, boxes, **post_kwargs)
                synchronize(device)
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
