"""``python -m ssd_lightning.summary [model.backbone=NAME] [model.num_classes=N] [ckpt_path=FILE]``.

Prints SSD300's layers, parameters and FLOPs (:mod:`ssd_lightning.model.summary`) for a backbone and class
count or for a checkpoint. Overrides are parsed with Hydra's override grammar and errors end in one line, as
in every script (:func:`ssd_lightning.runtime.entry.run_entry_point`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from torch import nn

from ssd_lightning.checkpoints import load_model
from ssd_lightning.errors import ConfigError
from ssd_lightning.model import SSD300
from ssd_lightning.model.summary import model_summary
from ssd_lightning.runtime.entry import run_entry_point

__all__ = ["main"]

USAGE = """usage: python -m ssd_lightning.summary [model.backbone=NAME] [model.num_classes=N] [ckpt_path=FILE]

Prints the layers, parameters and FLOPs (thop convention, one 300x300 image) of SSD300.
  model.backbone      resnet18 | resnet34 | resnet50 (default) | resnet101 | resnet152
  model.num_classes   classes including the background (default 81, COCO; null: 81)
  ckpt_path           a train.py or NVIDIA checkpoint: its backbone and class count
Other model.* keys of the model group (optimiser, thresholds, backbone_weights ...) do not change the
summary and are ignored.

Examples:
  python -m ssd_lightning.summary
  python -m ssd_lightning.summary model.backbone=resnet18 model.num_classes=5
  python -m ssd_lightning.summary ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt"""


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` arguments in Hydra's override grammar (``+``/``++`` prefixes allowed) -> {key: value}.

    Raises:
        hydra.errors.OverrideParseException: an argument Hydra cannot parse (one line via the entry point).
    """
    return {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(list(argv))}


def summary_model(values: dict[str, Any]) -> tuple[nn.Module, str]:
    """The model ``values`` describe and its title line. Raises ConfigError naming the key and the fix."""
    values = dict(values)
    ckpt_path = values.pop("ckpt_path", None)
    arch: dict[str, Any] = {"backbone": "resnet50", "num_classes": 81}
    for key, value in values.items():
        if not key.startswith("model."):
            raise ConfigError(f"unknown key {key!r}: use model.backbone, model.num_classes or ckpt_path")
        name = key[len("model.") :]
        if name == "backbone":
            arch["backbone"] = str(value)
        elif name == "num_classes" and value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"model.num_classes={value}: not an integer")
            arch["num_classes"] = value
    if ckpt_path:
        if any(k in values for k in ("model.backbone", "model.num_classes")):
            raise ConfigError("give either ckpt_path or model.backbone/model.num_classes, not both")
        model = load_model(str(ckpt_path))
        return (
            model,
            f"SSD300(backbone={model.backbone_name}, num_classes={model.num_classes}) from {ckpt_path}",
        )
    try:
        model = SSD300(backbone=arch["backbone"], num_classes=arch["num_classes"])
    except ValueError as err:  # an unknown backbone, a class count below 2
        raise ConfigError(str(err)) from None
    return model, f"SSD300(backbone={arch['backbone']}, num_classes={arch['num_classes']})"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary of the model ``argv`` describes; returns 0. Bad arguments raise (ConfigError,
    CheckpointError, Hydra's OverrideParseException): :func:`run_entry_point` makes them one line, exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    model, title = summary_model(parse_overrides(argv))
    print(title)
    print(model_summary(model), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
