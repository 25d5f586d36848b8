"""What a finished task reports: the COCO table on stdout, the metric a sweeper optimises, the file names.

``metrics.json``, ``detections.json`` and ``precision_recall.png`` are written by the tasks (atomically, rank
0) under these names.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from ssd_lightning.class_metrics import format_class_table
from ssd_lightning.errors import ConfigError
from ssd_lightning.evaluation import CocoEvaluation, format_table
from ssd_lightning.runtime.ddp_sweeps import in_multirun

log = logging.getLogger("ssd_lightning")

METRICS_FILE = "metrics.json"
DETECTIONS_FILE = "detections.json"
PR_PLOT_FILE = "precision_recall.png"
#: the key of the per-class table in ``metrics.json`` (beside the 12 COCO numbers)
PER_CLASS_KEY = "per_class"


def metrics_document(evaluation: CocoEvaluation) -> dict[str, Any]:
    """What ``metrics.json`` holds: the 12 COCO numbers, then ``per_class``: ``{class name: {"AP", "AP50",
    "num_gt"}}`` (``-1``: undefined, as COCO reports it)."""
    return {**evaluation.metrics, PER_CLASS_KEY: evaluation.per_class}


def metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    """``metrics[name]`` as a float (what a sweep optimises); None when no name is given, or when the metric
    was not logged outside a sweep (inside one it is an error: the sweeper needs the value)."""
    if not name:
        return None
    if name not in metrics:
        if not in_multirun():
            log.warning("optimized_metric %s was not logged", name)
            return None
        raise ConfigError(
            f"optimized_metric={name!r} was not logged (logged: {', '.join(sorted(metrics)) or 'nothing'}); "
            "validation must run at least once (it always runs after the last epoch)"
        )
    return float(metrics[name])


def print_table(
    metrics: Mapping[str, float],
    header: str | None = None,
    per_class: Mapping[str, Mapping[str, float | int]] | None = None,
) -> None:
    """The 12-line COCO table, and the per-class table (weakest class first) under it when given."""
    if header:
        print(header)
    print(format_table(metrics), flush=True)
    if per_class:
        print(format_class_table(per_class), flush=True)


def quiet_known_warnings() -> None:
    # Training metrics are rank 0's (as NVIDIA logs them); val/* are identical on every rank by construction.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
