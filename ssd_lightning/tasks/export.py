"""``export.py``: the network as ONNX or a torch.export archive, verified before it is kept.

Both go through ``torch.export`` with a dynamic batch dimension: ONNX with the current exporter
(``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``), the archive with ``torch.export.save``
(``.pt2``). TorchScript (``torch.jit.trace``) is deprecated in torch 2.14 and no longer written: the
``.pt2`` archive is its replacement. The file is written to a temporary name, run on random input with a
batch size other than the example's (onnxruntime for ONNX), compared with PyTorch within a tolerance, and only
then renamed into place; the class ids and names and the preprocessing constants travel with it as metadata
(ONNX ``metadata_props``, read back by ``predict.py ckpt_path=model.onnx``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
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
from ssd_lightning.model.onnx_file import OnnxSSD300

# format -> file suffix
EXPORT_FORMATS: dict[str, str] = {
    "onnx": ".onnx",
    "exported_program": ".pt2",
}

#: formats no longer written, and what to use instead
RETIRED_FORMATS: dict[str, str] = {
    "torchscript": (
        "format=torchscript: TorchScript (torch.jit.trace) is deprecated in torch 2.14 and no longer "
        "written; use format=exported_program (a torch.export .pt2 file: "
        "torch.export.load(path).module()) or format=onnx"
    ),
}


METADATA_FILE = "ssd_lightning.json"  # extra file in torch.export archives


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


def _check_format(format: str) -> None:
    if format in RETIRED_FORMATS:
        raise ConfigError(RETIRED_FORMATS[format])
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format={format}: unknown export format; use one of {', '.join(EXPORT_FORMATS)}")


def _dynamic_batch(example: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """The example (at least 2 images: ``torch.export`` specialises a size-1 dimension, which would then not
    stay dynamic) and the ``dynamic_shapes`` that make the batch dimension of ``images`` dynamic."""
    if example.shape[0] == 1:
        example = example.expand(2, -1, -1, -1)
    return example, {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}


def _export_onnx(model: SSD300, example: torch.Tensor, path: Path, metadata: dict, opset: int) -> None:
    try:
        import onnx  # lazy: optional (the onnx extra), needed for format=onnx only
    except ImportError:
        onnx = None
    if onnx is None or importlib.util.find_spec("onnxscript") is None:  # the dynamo exporter needs onnxscript
        raise ConfigError(
            "format=onnx needs the onnx, onnxscript and onnxruntime packages: "
            "pip install onnx onnxscript onnxruntime"
        )
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines narrate every graph-optimisation pass
        logging.getLogger(name).setLevel(logging.WARNING)
    example, dynamic_shapes = _dynamic_batch(example)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["locs", "confs"],
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        verbose=False,
    )
    for key, value in metadata.items():
        program.model.metadata_props[key] = value if isinstance(value, str) else json.dumps(value)
    program.save(str(path), external_data=False)  # one file (the weights inside), renamed as a whole
    onnx.checker.check_model(str(path))


def _run_onnx(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return OnnxSSD300(path)(images)


def _export_program(model: SSD300, example: torch.Tensor, path: Path, metadata: dict) -> None:
    example, dynamic_shapes = _dynamic_batch(example)
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
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
    opset: int = 18,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` (eval mode, CPU, float32) to ``path`` and check the file against PyTorch.

    The network only: input ``images [N, 3, 300, 300]`` (``N`` dynamic), outputs ``locs [N, 4, 8732]`` and
    ``confs [N, C, 8732]`` as :meth:`SSD300.forward`; post-process with ``ssd_lightning.postprocess``. The
    file is exported from a batch of ``max(batch_size, 2)`` and checked on a random batch of
    ``batch_size + 1`` images (so the dynamic batch is checked too):
    ``max|exported - torch| <= atol + rtol * max|torch|``. It is written under a temporary name and renamed
    only when the check passes.

    Raises:
        ConfigError: an unknown or retired format, missing onnx/onnxscript/onnxruntime.
        ExportError: the exported file does not reproduce the model.
    """
    _check_format(format)
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
    _check_format(fmt)
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
    runtime = {"onnx": "onnxruntime", "exported_program": "torch.export.load"}[fmt]
    print(
        f"exported {result.path} ({fmt}, dynamic batch); checked with {runtime} against PyTorch on random "
        f"input [{result.check_batch},3,300,300]: max abs difference {result.max_abs_diff:.3g} "
        f"(tolerance {result.tolerance:.3g})",
        flush=True,
    )
    return result
