"""What a finished task reports: the COCO table on stdout, the metric a sweeper optimises, the file names.

``metrics.json`` and ``detections.json`` are written by the tasks (atomically, rank 0) under these names.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from ssd_lightning.errors import ConfigError
from ssd_lightning.evaluation import format_table
from ssd_lightning.runtime.ddp_sweeps import in_multirun

log = logging.getLogger("ssd_lightning")

METRICS_FILE = "metrics.json"


DETECTIONS_FILE = "detections.json"


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


def print_table(metrics: Mapping[str, float], header: str | None = None) -> None:

    if header:
        print(header)
    print(format_table(metrics), flush=True)


def quiet_known_warnings() -> None:
    # Training metrics are rank 0's (as NVIDIA logs them); val/* are identical on every rank by construction.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
