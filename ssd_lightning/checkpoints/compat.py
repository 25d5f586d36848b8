"""Whether a checkpoint fits a config and a data set: the rules for resuming, evaluating and fine-tuning.

Every "does this model fit" question is answered here, once:

* the class count a config may ask for given the data set (:func:`check_num_classes`);
* resuming (``train.py ckpt_path=...``): the same network and the same categories (:func:`check_resume`);
* evaluating (``evaluate.py ckpt_path=...``, validation): the checkpoint's labels must be the validation set's
  categories (:func:`check_evaluation_classes`, :func:`check_label_space`), NVIDIA's 81-class COCO files
  included;
* fine-tuning (``model.init_from``) and loading weights: the key rule of
  :func:`ssd_lightning.checkpoints.reading.check_state_dict`.

Each raises a one-line :class:`~ssd_lightning.errors.CheckpointError` (or ``ConfigError`` for a config
value) naming the file and the fix: a model that silently does not fit would score an AP of about 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ssd_lightning.categories import COCO2017_CATEGORY_IDS
from ssd_lightning.checkpoints.reading import read_checkpoint
from ssd_lightning.errors import CheckpointError, ConfigError

__all__ = [
    "check_evaluation_classes",
    "check_label_space",
    "check_num_classes",
    "check_resume",
    "nvidia_coco_ids",
]


def check_num_classes(num_classes: int | None, num_categories: int) -> int:
    """The model's class count (background included) for a data set of ``num_categories`` categories.

    ``num_classes`` None: ``num_categories + 1``. A larger value is allowed (a wider head, e.g. to fine-tune
    NVIDIA's 81-class model on a subset); a smaller one raises ConfigError.
    """
    needed = int(num_categories) + 1
    if num_classes is None:
        return needed
    if int(num_classes) < needed:
        raise ConfigError(
            f"model.num_classes={num_classes} but the data set has {num_categories} categories "
            f"({needed} classes with the background): leave model.num_classes unset (null)"
        )
    return int(num_classes)


def nvidia_coco_ids(num_classes: int, category_ids: Sequence[int] | None, data_ids: Sequence[int]) -> bool:
    """Whether a model without category ids of its own is NVIDIA's 81-class COCO model on a set with the 80
    COCO 2017 categories: its labels are then the COCO ids in sorted order (NVIDIA's label order), whatever
    order the annotation file lists them in."""
    return (
        category_ids is None
        and sorted(int(i) for i in data_ids) == list(COCO2017_CATEGORY_IDS)
        and int(num_classes) == len(COCO2017_CATEGORY_IDS) + 1
    )


def check_evaluation_classes(
    ckpt_path: str | os.PathLike,
    num_classes: int,
    category_ids: Sequence[int] | None,
    data_ids: Sequence[int],
    ann_file: str | os.PathLike,
) -> list[int] | None:
    """The checkpoint's classes must be the validation set's categories (else the AP is silently ~0).

    A checkpoint with category ids of its own (train.py) has ``len(category_ids)`` classes, one without
    (NVIDIA, a bare state dict) ``num_classes - 1``, its labels 1..K standing for the data set's categories in
    the annotation file's order. The exception is :func:`nvidia_coco_ids`.

    Returns:
        the category ids the model must be given (NVIDIA's COCO model), else None (keep its own).
    Raises:
        CheckpointError: one line naming the checkpoint, the annotation file and the fix.
    """
    data_ids = [int(i) for i in data_ids]
    if nvidia_coco_ids(num_classes, category_ids, data_ids):
        return list(COCO2017_CATEGORY_IDS)
    classes = len(category_ids) if category_ids is not None else num_classes - 1
    if classes != len(data_ids):
        raise CheckpointError(
            f"{ckpt_path} has {classes} classes (num_classes={num_classes}) but the dataset {ann_file} "
            f"has {len(data_ids)} categories; evaluate on the dataset it was trained on or fine-tune with "
            f"model.init_from={ckpt_path}"
        )
    return None


def check_label_space(num_classes: int, category_ids: Sequence[int] | None, data_ids: Sequence[int]) -> None:
    """At validation: the model's label space must be the data set's (the file may list the same categories
    in another order: labels are written with the model's own ids)."""
    data_ids = [int(i) for i in data_ids]
    if category_ids is not None and sorted(category_ids) != sorted(data_ids):
        raise CheckpointError(
            f"the model was trained on {len(category_ids)} categories (ids {list(category_ids)[:5]}...) but "
            f"the validation annotations have {len(data_ids)} (ids {data_ids[:5]}...): evaluate on the data "
            "set the checkpoint was trained on"
        )
    if category_ids is None and num_classes - 1 < len(data_ids):
        raise CheckpointError(
            f"the model has {num_classes - 1} classes but the validation annotations have "
            f"{len(data_ids)} categories: evaluate on the data set the checkpoint was trained on"
        )


def check_resume(path: str | os.PathLike, hparams: Mapping[str, Any]) -> None:
    """``path`` must be a train.py checkpoint of the model the config builds (``hparams``: the new
    SSDModule's ``backbone``, ``num_classes``, ``category_ids``). Raises a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path {path} not found: pass a train.py checkpoint (<run dir>/checkpoints/last.ckpt)"
        )
    try:
        head = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        head = None  # read_checkpoint below names the problem
    loaded = read_checkpoint(path)
    if not isinstance(head, dict) or "optimizer_states" not in head or "loops" not in head:
        raise CheckpointError(
            f"ckpt_path {path} is not a train.py training checkpoint (no optimizer/loop state) and cannot be "
            "resumed; evaluate it with evaluate.py ckpt_path=..."
        )
    backbone, num_classes, category_ids = hparams["backbone"], hparams["num_classes"], hparams["category_ids"]
    if loaded.backbone != backbone or loaded.num_classes != num_classes:
        raise CheckpointError(
            f"ckpt_path {path} holds SSD300(backbone={loaded.backbone}, num_classes={loaded.num_classes}) "
            f"but the config builds SSD300(backbone={backbone}, num_classes={num_classes}): resume "
            "with the checkpoint's config (model.backbone, data.root)"
        )
    if loaded.category_ids is not None and category_ids is not None and loaded.category_ids != category_ids:
        raise CheckpointError(
            f"ckpt_path {path} was trained on other categories (ids {loaded.category_ids[:5]}...) than "
            f"data.root's ({list(category_ids)[:5]}...): resume on the same data set"
        )
