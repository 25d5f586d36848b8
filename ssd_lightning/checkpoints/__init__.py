"""Checkpoints: reading any SSD300 checkpoint, the rules for whether it fits, and writing them atomically.

* :mod:`.reading`: train.py (Lightning) checkpoints, NVIDIA DeepLearningExamples files and bare state dicts
  (:func:`load_model`, :func:`read_checkpoint`, :func:`load_weights_into`, :func:`checkpoint_categories`);
* :mod:`.compat`: resume / evaluation / fine-tuning compatibility rules;
* :mod:`.io`: :class:`AtomicCheckpointIO` (Lightning's checkpoint writer) and ``ckpt_path=last``.
"""

from ssd_lightning.checkpoints.compat import (
    check_evaluation_classes,
    check_label_space,
    check_num_classes,
    check_resume,
)
from ssd_lightning.checkpoints.io import AtomicCheckpointIO, find_last_checkpoint, resolve_ckpt_path
from ssd_lightning.checkpoints.reading import (
    LoadedCheckpoint,
    check_state_dict,
    checkpoint_categories,
    infer_backbone,
    infer_num_classes,
    load_model,
    load_weights_into,
    read_checkpoint,
)
from ssd_lightning.errors import CheckpointError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "LoadedCheckpoint",
    "check_evaluation_classes",
    "check_label_space",
    "check_num_classes",
    "check_resume",
    "check_state_dict",
    "checkpoint_categories",
    "find_last_checkpoint",
    "infer_backbone",
    "infer_num_classes",
    "load_model",
    "load_weights_into",
    "read_checkpoint",
    "resolve_ckpt_path",
]
