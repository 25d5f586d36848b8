"""``export.py``: the network as ONNX, TorchScript or a torch.export archive, verified before it is kept.

The file is written to a temporary name, run on random input with a batch size other than the example's
(onnxruntime for ONNX), compared with PyTorch within a tolerance, and only then renamed into place; the class
ids and names and the preprocessing constants travel with it as metadata.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ssd_lightning.categories import CategoryMap
from ssd_lightning.checkpoints import LoadedCheckpoint, load_model, read_checkpoint
from ssd_lightning.checkpoints.reading import checkpoint_categories
from ssd_lightning.errors import ConfigError, ExportError
from ssd_lightning.fileio import atomic_path
from ssd_lightning.images import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE
from ssd_lightning.model import SSD300

# format -> file suffix
EXPORT_FORMATS: dict[str, str] = {
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
    "exported_program": ".pt2",
}


METADATA_FILE = "ssd_lightning.json"  # extra file in TorchScript / torch.export archives


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    tolerance: float
    check_batch: int


def _metadata(ckpt: LoadedCheckpoint, categories: CategoryMap) -> dict[str, Any]:

    return {
        "model": "SSD300",
        "backbone": ckpt.backbone,
        "num_classes": ckpt.num_classes,
        "category_ids": categories.dataset_ids,
        "class_names": categories.names,
        "input": "images float32 [N,3,300,300]: RGB squash-resized to 300x300, (x/255 - mean) / std",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "outputs": "locs [N,4,8732] (xywh offsets, scale 0.1/0.2), confs [N,num_classes,8732] (logits)",
        "default_boxes": "ssd_lightning.boxes.ssd300_default_boxes()",
    }


@contextlib.contextmanager
def _quiet_export_warnings() -> Iterator[None]:
    """Silence the exporters' deprecation notices (legacy ONNX exporter, ``torch.jit``), tracer warnings."""
    with warnings.catch_warnings():
        for pattern in (
            r".*legacy TorchScript-based ONNX export.*",
            r".*feature will be removed.*",
            r".*torch\.jit\..*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _export_onnx(model: SSD300, example: torch.Tensor, path: Path, metadata: dict, opset: int) -> None:
    try:
        import onnx  # lazy: a dev dependency, needed for format=onnx only
    except ImportError:
        raise ConfigError(
            "format=onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime"
        ) from None
    # The TorchScript-based exporter: the torch.export-based one (dynamo=True) needs onnxscript.
    with _quiet_export_warnings():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["locs", "confs"],
            dynamic_axes={"images": {0: "batch"}, "locs": {0: "batch"}, "confs": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _run_onnx(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import onnxruntime as ort  # lazy: a dev dependency, needed for format=onnx only
    except ImportError:
        raise ConfigError(
            "format=onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    locs, confs = session.run(["locs", "confs"], {"images": images.numpy()})
    return torch.from_numpy(locs), torch.from_numpy(confs)


def _export_torchscript(model: SSD300, example: torch.Tensor, path: Path, metadata: dict) -> None:
    with _quiet_export_warnings():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def _run_torchscript(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _quiet_export_warnings(), torch.inference_mode():
        return torch.jit.load(str(path), map_location="cpu")(images)


def _export_program(model: SSD300, example: torch.Tensor, path: Path, metadata: dict) -> None:
    if example.shape[0] == 1:  # torch.export specialises a size-1 dimension: it would not stay dynamic
        example = example.expand(2, -1, -1, -1)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def _run_program(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    module = torch.export.load(str(path)).module()
    with torch.inference_mode():
        return module(images)


def export_model(
    model: SSD300,
    path: str | os.PathLike,
    format: str = "onnx",
    *,
    metadata: dict[str, Any] | None = None,
    batch_size: int = 2,
    opset: int = 17,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` (eval mode, CPU, float32) to ``path`` and check the file against PyTorch.

    The network only: input ``images [N, 3, 300, 300]`` (``N`` dynamic), outputs ``locs [N, 4, 8732]`` and
    ``confs [N, C, 8732]`` as :meth:`SSD300.forward`; post-process with ``ssd_lightning.postprocess``. The
    file is traced at batch ``batch_size`` and checked on a random batch of ``batch_size + 1`` images (so the
    dynamic batch is checked too): ``max|exported - torch| <= atol + rtol * max|torch|``. It is written under
    a temporary name and renamed only when the check passes.

    Raises:
        ConfigError: an unknown format, missing onnx/onnxruntime.
        ExportError: the exported file does not reproduce the model.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format={format}: unknown export format; use one of {', '.join(EXPORT_FORMATS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be at least 1")
    path = Path(path)
    model = model.float().cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(batch_size, 3, INPUT_SIZE, INPUT_SIZE, generator=generator)
    check = torch.randn(batch_size + 1, 3, INPUT_SIZE, INPUT_SIZE, generator=generator)
    metadata = metadata or {}
    # a temporary file beside the target (same suffix: torch.export wants .pt2), renamed once checked
    with atomic_path(path) as tmp:
        if format == "onnx":
            _export_onnx(model, example, tmp, metadata, opset)
            got = _run_onnx(tmp, check)
        elif format == "torchscript":
            _export_torchscript(model, example, tmp, metadata)
            got = _run_torchscript(tmp, check)
        else:
            _export_program(model, example, tmp, metadata)
            got = _run_program(tmp, check)
        with torch.inference_mode():
            want = model(check)
        if [tuple(g.shape) for g in got] != [tuple(w.shape) for w in want]:
            raise ExportError(
                f"the {format} file gives shapes {[list(g.shape) for g in got]} for a batch of "
                f"{batch_size + 1}, PyTorch {[list(w.shape) for w in want]}: the batch dimension is not "
                "dynamic"
            )
        diff = max(float((g.float() - w).abs().max()) for g, w in zip(got, want, strict=True))
        scale = max(float(w.abs().max()) for w in want)
        tolerance = atol + rtol * scale
        if not math.isfinite(diff) or diff > tolerance:
            raise ExportError(
                f"the {format} file differs from PyTorch by up to {diff:.3g} (tolerance {tolerance:.3g}) on "
                "random input: not written; try another opset (opset=...) or format"
            )
    return ExportResult(path, format, diff, tolerance, batch_size + 1)


def export(cfg: DictConfig) -> ExportResult:
    """``export.py``: export the model of ``cfg.ckpt_path`` to ``cfg.format`` and verify it (see
    :func:`export_model`). The file goes to ``cfg.output`` or ``<run dir>/ssd300_<backbone><suffix>``."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        raise ConfigError("export.py needs ckpt_path=CHECKPOINT (a train.py .ckpt or an NVIDIA .pt file)")
    fmt = str(cfg.format)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"format={fmt}: unknown export format; use one of {', '.join(EXPORT_FORMATS)}")
    ckpt = read_checkpoint(ckpt_path)
    categories = checkpoint_categories(ckpt)
    model = load_model(ckpt_path)
    output = cfg.get("output") or Path(cfg.paths.output_dir) / f"ssd300_{ckpt.backbone}{EXPORT_FORMATS[fmt]}"
    print(f"SSD300(backbone={ckpt.backbone}, num_classes={ckpt.num_classes}) from {ckpt_path}", flush=True)
    result = export_model(
        model,
        output,
        fmt,
        metadata=_metadata(ckpt, categories),
        batch_size=int(cfg.batch_size),
        opset=int(cfg.opset),
        atol=float(cfg.atol),
        rtol=float(cfg.rtol),
        seed=int(cfg.seed),
    )
    runtime = {
        "onnx": "onnxruntime",
        "torchscript": "torch.jit.load",
        "exported_program": "torch.export.load",
    }[fmt]
    print(
        f"exported {result.path} ({fmt}, dynamic batch); checked with {runtime} against PyTorch on random "
        f"input [{result.check_batch},3,300,300]: max abs difference {result.max_abs_diff:.3g} "
        f"(tolerance {result.tolerance:.3g})",
        flush=True,
    )
    return result
