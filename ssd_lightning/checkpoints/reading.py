"""Load an SSD300 from a train.py (Lightning) checkpoint or an NVIDIA DeepLearningExamples checkpoint.

* train.py: ``{"state_dict": {"model.<SSD300 key>": ...}, "hyper_parameters": {"backbone", "num_classes",
  "category_ids", "class_names", ...}, ...}``.
* NVIDIA: ``{"model": state_dict, "label_map"?: {0: "background", 1: "person", ...}, "epoch", ...}``, keys
  possibly prefixed ``module.`` (saved from DistributedDataParallel).
* a bare SSD300 ``state_dict`` (``torch.save(model.state_dict(), path)``).

:func:`load_weights_into` copies such a checkpoint into an existing model (``model.init_from``: fine-tuning,
with fresh classification heads when the class count differs). Files are always read with
``torch.load(weights_only=True)``. The backbone and class count are read from the
hyper-parameters when present, otherwise inferred from the state dict.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ssd_lightning.boxes import ssd300_default_boxes
from ssd_lightning.categories import COCO2017_CATEGORY_IDS, COCO2017_CLASS_NAMES, CategoryMap
from ssd_lightning.errors import CheckpointError
from ssd_lightning.model import SSD300

log = logging.getLogger(__name__)

TRUNK = "feature_extractor.feature_extractor."
LAYER3 = TRUNK + "6."  # conv4_x
# (bottleneck?, blocks in layer3) -> backbone
BACKBONE_BY_LAYER3 = {
    (False, 2): "resnet18",
    (False, 6): "resnet34",
    (True, 6): "resnet50",
    (True, 23): "resnet101",
    (True, 36): "resnet152",
}


@dataclass
class LoadedCheckpoint:
    """What a checkpoint says about its model.

    Attributes:
        state_dict: SSD300 state dict (NVIDIA key names, no prefix).
        backbone: ``resnet18`` ... ``resnet152``.
        num_classes: classes including the background.
        category_ids: dataset category id of labels 1..C-1 (train.py checkpoints), else None.
        class_names: names of labels 1..C-1 (train.py hyper-parameters or NVIDIA ``label_map``), else None.
    """

    state_dict: dict[str, torch.Tensor]
    backbone: str
    num_classes: int
    category_ids: list[int] | None = None
    class_names: list[str] | None = None


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SSD300:
    """An eval-mode :class:`SSD300` with the weights of checkpoint ``path`` (see the module docstring).

    Raises:
        CheckpointError: missing file, not an SSD300 checkpoint, or keys/shapes that do not match.
    """
    ckpt = read_checkpoint(path, map_location)
    model = SSD300(backbone=ckpt.backbone, num_classes=ckpt.num_classes)
    check_state_dict(
        model,
        ckpt.state_dict,
        f"{path} does not match SSD300(backbone={ckpt.backbone!r}, num_classes={ckpt.num_classes})",
    )
    model.load_state_dict(ckpt.state_dict, strict=False)  # only num_batches_tracked may be missing (checked)
    return model.to(map_location).eval()


def load_weights_into(model: SSD300, path: str | os.PathLike, *, strict_classes: bool = False) -> list[str]:
    """Copy the weights of checkpoint ``path`` (train.py, NVIDIA or bare state dict) into ``model``.

    For ``model.init_from=...`` (fine-tuning, e.g. from NVIDIA's published COCO checkpoints). The trunk must
    match; the trunk, the extra blocks and the box heads (``loc.*``) are copied; when the class count differs
    the classification heads (``conf.*``) keep their fresh initialisation (or, with ``strict_classes``, a
    CheckpointError is raised).

    Returns:
        the keys of ``model`` left as they were (``conf.*`` when the class counts differ, else empty).
    Raises:
        CheckpointError: not an SSD300 checkpoint, another backbone, or keys/shapes that do not match.
    """
    ckpt = read_checkpoint(path)
    if ckpt.backbone != model.backbone_name:
        raise CheckpointError(
            f"{path} holds an SSD300 with a {ckpt.backbone} trunk but the model has a {model.backbone_name} "
            f"trunk: set model.backbone={ckpt.backbone}"
        )
    state = dict(ckpt.state_dict)
    kept: list[str] = []
    if ckpt.num_classes != model.num_classes:
        if strict_classes:
            raise CheckpointError(
                f"{path} holds an SSD300 with {ckpt.num_classes} classes but the model has "
                f"{model.num_classes}"
            )
        kept = [k for k in model.state_dict() if k.startswith("conf.")]
        state = {k: v for k, v in state.items() if not k.startswith("conf.")}
        log.info(
            "%s: %d classes in the checkpoint, %d in the model: classification heads start fresh",
            path,
            ckpt.num_classes,
            model.num_classes,
        )
    # checked before anything is copied: the model is left as it was
    check_state_dict(model, state, f"{path} does not match the model", ignore=kept)
    model.load_state_dict(state, strict=False)
    return kept


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read checkpoint ``path`` without building a model. Raises :class:`CheckpointError`."""
    obj = _load(Path(path), map_location)
    hparams: dict = {}
    names = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning
        hparams = obj.get("hyper_parameters") or {}
        state = {k[6:]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        names = hparams.get("class_names")
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # NVIDIA
        state = obj["model"]
        names = _label_map_names(obj.get("label_map"))
    else:
        state = obj
    state = _strip_module(state)
    if not _looks_like_ssd300(state):
        raise CheckpointError(
            f"{path} is not an SSD300 checkpoint: expected a train.py checkpoint (.ckpt), an NVIDIA "
            "DeepLearningExamples file with a 'model' state dict, or an SSD300 state_dict"
        )
    return LoadedCheckpoint(
        state_dict=state,
        backbone=hparams.get("backbone") or infer_backbone(state, path),
        num_classes=int(hparams.get("num_classes") or infer_num_classes(state)),
        category_ids=_as_list(hparams.get("category_ids")),
        class_names=_as_list(names),
    )


def infer_backbone(state: dict[str, torch.Tensor], path: str | os.PathLike = "checkpoint") -> str:
    """Backbone name from the layer3 (conv4_x) blocks of an SSD300 state dict."""
    blocks = {k[len(LAYER3) :].split(".")[0] for k in state if k.startswith(LAYER3)}
    bottleneck = f"{LAYER3}0.conv3.weight" in state
    name = BACKBONE_BY_LAYER3.get((bottleneck, len(blocks)))
    if name is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(f"{path}: no known ResNet trunk has {len(blocks)} {kind} blocks in layer3")
    return name


def infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    """Classes (background included) from the first conf head: its outputs are (boxes per cell) x classes."""
    boxes_per_cell = ssd300_default_boxes().boxes_per_location[0]
    return state["conf.0.weight"].shape[0] // boxes_per_cell


def _load(path: Path, map_location: str | torch.device) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if refused:
            raise CheckpointError(
                f"{path} holds a pickled {refused[1]}, which torch.load(weights_only=True) refuses: "
                "save plain tensors and Python types only"
            ) from None
        raise CheckpointError(
            f"{path} is not an SSD300 checkpoint: expected a train.py checkpoint (.ckpt) or an NVIDIA "
            f"DeepLearningExamples file with a 'model' state dict (torch.load failed: {type(err).__name__})"
        ) from None


def _strip_module(state: object) -> object:
    """Drop a DistributedDataParallel ``module.`` (or torch.compile ``_orig_mod.``) prefix."""
    for prefix in ("module.", "_orig_mod."):
        if isinstance(state, dict) and state and all(str(k).startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _looks_like_ssd300(state: object) -> bool:
    if not isinstance(state, dict):
        return False
    needed = ("conf.0.weight", "loc.0.weight", f"{TRUNK}0.weight", f"{LAYER3}0.conv1.weight")
    return all(isinstance(state.get(k), torch.Tensor) for k in needed)


def _label_map_names(label_map: object) -> list[str] | None:
    """NVIDIA ``label_map`` {0: 'background', 1: 'person', ...} -> names of labels 1..C-1."""
    if not isinstance(label_map, dict):
        return None
    return [str(label_map[k]) for k in sorted(label_map, key=int) if int(k) != 0]


def _as_list(value: object) -> list | None:
    return None if value is None else list(value)


def state_dict_mismatch(
    model: torch.nn.Module, state: dict[str, torch.Tensor], ignore: Sequence[str] = ()
) -> list[str]:
    """What keeps ``state`` from loading into ``model``: missing keys (``num_batches_tracked`` and ``ignore``
    aside), unexpected keys and shape mismatches, as short phrases (empty: it fits)."""
    expected = model.state_dict()
    skip = set(ignore)
    missing = [
        k for k in expected if k not in state and k not in skip and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(getattr(state[k], 'shape', []))} != {list(v.shape)}"
        for k, v in expected.items()
        if k in state and getattr(state[k], "shape", None) != v.shape
    ]
    return [
        f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", shapes),
        )
        if keys
    ]


def check_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, ignore: Sequence[str] = ()
) -> None:
    """Raise a one-line CheckpointError ``<what>: <problems>`` when ``state`` does not fit ``model``."""
    problems = state_dict_mismatch(model, state, ignore)
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def checkpoint_categories(ckpt: LoadedCheckpoint) -> CategoryMap:
    """Category ids and names of labels 1..C-1 for the model of ``ckpt``.

    Ids: the checkpoint's (train.py), else the COCO 2017 ids for an 81-class model (NVIDIA's checkpoints carry
    none), else the contiguous labels 1..C-1. Names: the checkpoint's (train.py ``class_names`` or NVIDIA
    ``label_map``), else the COCO names for an 81-class model without ids of its own, else ``class <label>``.

    Raises:
        CheckpointError: ids or names that do not number ``num_classes - 1``.
    """
    count = ckpt.num_classes - 1
    coco = ckpt.num_classes == len(COCO2017_CATEGORY_IDS) + 1 and ckpt.category_ids is None
    ids = ckpt.category_ids if ckpt.category_ids is not None else (COCO2017_CATEGORY_IDS if coco else None)
    ids = list(range(1, count + 1)) if ids is None else [int(i) for i in ids]
    names = ckpt.class_names if ckpt.class_names is not None else (COCO2017_CLASS_NAMES if coco else None)
    names = [f"class {i}" for i in range(1, count + 1)] if names is None else [str(n) for n in names]
    for what, values in (("category ids", ids), ("class names", names)):
        if len(values) != count:
            raise CheckpointError(
                f"the checkpoint's model has {ckpt.num_classes} classes (background included) but "
                f"{len(values)} {what} for labels 1..{count}: the checkpoint is inconsistent"
            )
    return CategoryMap(ids, names)
