"""The precision-recall plot of ``evaluate.py``: overall and per-class curves at IoU 0.5 and 0.75 (one PNG).

The curves are COCO's own (``CocoEvaluation.precision``: interpolated precision at 101 recall points, area
"all", 100 detections per image); the overall curve is the mean over the classes with ground truth, so the
area under it is the AP50 / AP75 of the 12-line table. matplotlib draws on an Agg canvas of its own (no
display, no pyplot state).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ssd_lightning.class_metrics import CocoEvaluation
from ssd_lightning.fileio import atomic_write

__all__ = ["PLOT_IOUS", "write_pr_plot"]

#: IoU thresholds of the two panels.
PLOT_IOUS: tuple[float, ...] = (0.5, 0.75)
_LEGEND_MAX = 12  # more classes than this: the per-class curves are drawn without a legend


def _mean_curve(precision: np.ndarray) -> np.ndarray:
    """``[R, K] -> [R]``: mean over the classes with ground truth (entries > -1); -1 everywhere when none."""
    defined = precision > -1
    total = np.where(defined, precision, 0.0).sum(axis=1)
    count = defined.sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), -1.0)


def write_pr_plot(evaluation: CocoEvaluation, path: str | os.PathLike) -> Path | None:
    """Write the PNG of ``evaluation``'s precision-recall curves to ``path`` atomically (``fileio``).

    Two panels (IoU 0.5, 0.75); each shows every class with ground truth as a thin line and the mean over
    them as a thick black line labelled with its AP. Returns ``path``, or None when nothing was evaluated
    (no precision array): no file is written then.
    """
    if evaluation.precision is None:
        return None
    recall = np.asarray(evaluation.recall_thresholds)
    keys = list(evaluation.per_class)
    figure = Figure(figsize=(12, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    for panel, iou in enumerate(PLOT_IOUS, start=1):
        axes = figure.add_subplot(1, len(PLOT_IOUS), panel)
        t = int(np.argmin(np.abs(np.asarray(evaluation.iou_thresholds) - iou)))
        curves = evaluation.precision[t]  # [R, K]
        drawn = [k for k in range(curves.shape[1]) if (curves[:, k] > -1).any()]
        for k in drawn:
            axes.plot(recall, curves[:, k], linewidth=0.8, alpha=0.6, label=keys[k])
        mean = _mean_curve(curves)
        if (mean > -1).any():
            ap = float(mean[mean > -1].mean())
            axes.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes (AP {ap:.3f})")
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        axes.set_title(f"IoU {iou:.2f}")
        axes.grid(alpha=0.3)
        if len(drawn) <= _LEGEND_MAX:
            axes.legend(loc="lower left", fontsize="small")
        else:
            axes.legend(axes.lines[-1:], [axes.lines[-1].get_label()], loc="lower left", fontsize="small")
    with atomic_write(path, "wb", what="plot") as f:
        figure.savefig(f, format="png", dpi=100)
    return Path(path)
