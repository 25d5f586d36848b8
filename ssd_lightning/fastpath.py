"""The fast path: batched device post-processing, in-place ``torch.compile``, optimizer kernels, host-sync
accounting and the Lightning callback that switches them on for a training run.

Every piece is optional and switched from config (``conf/benchmark.yaml``, ``fastpath.*``); with all of them
off the project computes exactly what it computes without this module. What each switch does:

* :func:`postprocess_batched`: NVIDIA SSD300 v1.1's evaluation decode (per image and class: score >
  threshold, the best 200 candidates, greedy NMS at IoU 0.5; then the best 200 per image) for a whole batch
  with a fixed number of tensor operations: no Python loop over images or classes, and no per-class NMS
  kernel launch (torchvision's ``batched_nms`` loops over the classes in Python once more than a few thousand
  boxes enter it). The greedy NMS is exact: the IoU is NVIDIA's float32 ``calc_iou_tensor`` formula and a box
  is suppressed by a kept, higher-scoring box of its class unless ``IoU < iou_threshold`` (NVIDIA's keep
  rule, which also drops a box whose IoU is NaN).
* :func:`compile_module`: ``nn.Module.compile`` in place (state-dict keys unchanged, checkpoints stay
  loadable).
* :func:`set_optimizer_impl`: pick ``torch.optim.SGD``'s for-loop, ``foreach`` or ``fused`` kernel on an
  optimizer that already exists (Lightning builds it in ``configure_optimizers``). ``fused`` also lets the
  fp16 ``GradScaler`` pass its scale and inf flag to the kernel instead of reading the inf flag on the host
  every step.
* :class:`HostSyncCounter`: counts the operations that make the host wait for the device (``.item()``,
  ``bool(tensor)``, ``.tolist()``, ``.cpu()``, blocking host<->device copies) while it is active.
* :class:`FastPathCallback`: applies compile / optimizer kernel / cuDNN autotuning / matmul precision to a
  Lightning run of :class:`~ssd_lightning.module.SSDModule`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ssd_lightning.boxes import DefaultBoxes, decode_boxes
from ssd_lightning.postprocess import _nms_threshold

__all__ = [
    "OPTIMIZER_IMPLS",
    "FastPathCallback",
    "HostSyncCounter",
    "compile_module",
    "greedy_nms_padded",
    "postprocess_batched",
    "set_optimizer_impl",
    "suppression_matrix",
]

log = logging.getLogger(__name__)

#: ``torch.optim`` step implementations: ``auto`` (PyTorch's default: foreach when every parameter is on a
#: CUDA device, else the for-loop), ``foreach`` (multi-tensor kernels), ``fused`` (one fused kernel per
#: device/dtype; CPU and CUDA), ``loop`` (one kernel per parameter).
OPTIMIZER_IMPLS: tuple[str, ...] = ("auto", "foreach", "fused", "loop")

#: NMS scan methods of :func:`greedy_nms_padded`.
NMS_METHODS: tuple[str, ...] = ("auto", "sequential", "fixed_point")
#: NMS methods of :func:`postprocess_batched`: those of :func:`greedy_nms_padded`, plus ``kernel`` (each
#: group through torchvision's C++/CUDA NMS kernel, one call per group) and ``hybrid`` (groups wider than
#: ``_KERNEL_MIN_WIDTH`` through the kernel, the others ``sequential``; the CPU default). The kernel computes
#: the IoU with the same float32 operations and suppresses ``IoU >= iou_threshold`` too (the threshold is
#: passed as the float32 just below it); the one difference from NVIDIA: a NaN IoU (boxes of zero or infinite
#: area) does not suppress there.
POSTPROCESS_NMS_METHODS: tuple[str, ...] = (*NMS_METHODS, "kernel", "hybrid")
_KERNEL_MIN_WIDTH = 32


# ----------------------------------------------------------------------------------------------------
# Batched post-processing
# ----------------------------------------------------------------------------------------------------


def suppression_matrix(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Which box suppresses which, within each group of score-sorted boxes.

    Args:
        boxes: [G, K, 4] float32 ltrb boxes, each group sorted by decreasing score.
        iou_threshold: NVIDIA's ``criteria``.
    Returns:
        [G, K, K] bool, ``S[g, i, j]`` true when ``j > i`` and NOT ``IoU(box_i, box_j) < iou_threshold``,
        the IoU computed with the operations of NVIDIA's ``calc_iou_tensor`` in float32 (so the same bits; a
        NaN IoU suppresses, as NVIDIA's ``ious < criteria`` filter drops it).
    """
    left, top, right, bottom = boxes.permute(2, 0, 1).contiguous()  # [G, K] each
    # intersection width / height: min(r) - max(l), negative -> 0 (NVIDIA: delta[delta < 0] = 0; NaN stays)
    inter = torch.minimum(right[:, :, None], right[:, None, :])
    inter -= torch.maximum(left[:, :, None], left[:, None, :])
    inter.clamp_(min=0)
    height = torch.minimum(bottom[:, :, None], bottom[:, None, :])
    height -= torch.maximum(top[:, :, None], top[:, None, :])
    inter *= height.clamp_(min=0)
    area = (right - left) * (bottom - top)
    union = torch.add(area[:, :, None], area[:, None, :], out=height)  # a_i + a_j == a_j + a_i exactly
    union -= inter
    keep_pair = inter.div_(union) < iou_threshold
    k = boxes.shape[1]
    later = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu_(diagonal=1)
    return keep_pair.logical_not_().logical_and_(later)


def greedy_nms_padded(
    suppress: torch.Tensor,
    valid: torch.Tensor,
    method: str = "auto",
    sizes: list[int] | None = None,
) -> torch.Tensor:
    """Greedy NMS over padded groups of score-sorted boxes.

    Box ``j`` of a group is kept when it is valid and no kept box ``i < j`` suppresses it
    (``suppress[g, i, j]``); box 0 of a group, if valid, is always kept. This is the greedy algorithm (take
    the best remaining box, drop what it suppresses, repeat) written as a triangular system; its solution
    is unique, so both methods below give exactly the greedy result.

    Args:
        suppress: [G, K, K] bool, false on and below the diagonal (see :func:`suppression_matrix`).
        valid: [G, K] bool, the real boxes (padding: false; padding never suppresses).
        method: ``sequential`` (K - 1 steps, each O(G*K) vectorised over the groups; no host
            synchronisation; best on CPU), ``fixed_point`` (Jacobi iteration ``keep = valid &
            ~any_i(keep_i & S_ij)`` until nothing changes: one batched matrix-vector product and one host
            check per iteration, as many iterations as the longest suppression chain plus one; best on GPU) or
            ``auto`` (``fixed_point`` on CUDA, else ``sequential``).
        sizes: optional valid-box count of each group, in decreasing order (the groups sorted so): the
            ``sequential`` scan then only touches the groups that still have boxes at each step.
    Returns:
        [G, K] bool, the kept boxes.
    """
    if method == "auto":
        method = "fixed_point" if suppress.device.type == "cuda" else "sequential"
    if method not in NMS_METHODS:
        raise ValueError(f"unknown NMS method {method!r}; use one of {', '.join(NMS_METHODS)}")
    num_groups, k = valid.shape
    if num_groups == 0 or k == 0:
        return valid.clone()
    suppress = suppress & valid[:, :, None]  # padding never suppresses
    if method == "sequential":
        keep = valid.clone()
        active = num_groups
        for i in range(k - 1):
            if sizes is not None:
                while active > 0 and sizes[active - 1] <= i + 1:
                    active -= 1  # no box after i in these groups
                if active == 0:
                    break
            # keep[:, i] is final here: only boxes before i can suppress box i
            keep[:active, i + 1 :] &= ~(suppress[:active, i, i + 1 :] & keep[:active, i : i + 1])
        return keep
    # 0/1 products summed over at most K terms: exact in float16 (K <= 2048) and float32
    dtype = torch.float16 if suppress.device.type == "cuda" and k <= 2048 else torch.float32
    matrix = suppress.to(dtype)
    keep = valid
    for _ in range(k + 1):
        suppressed = torch.bmm(keep.to(dtype)[:, None, :], matrix)[:, 0, :] > 0
        new = valid & ~suppressed
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def _pair_budget(device: torch.device) -> int:
    # float32 IoU temporaries per chunk: a few [chunk, K, K] tensors
    return 2**24 if device.type == "cuda" else 2**21


def postprocess_batched(
    locs: torch.Tensor,
    confs: torch.Tensor,
    default_boxes: DefaultBoxes,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 200,
    candidates_per_class: int = 200,
    *,
    nms_method: str = "auto",
    max_pairs: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """:func:`ssd_lightning.postprocess.postprocess` (NVIDIA's detections) with batched, exact greedy NMS.

    Same arguments, same result: N dicts with ``boxes`` [K, 4] float32 ltrb relative to the network input
    (unclipped), ``scores`` [K] float32, ``labels`` [K] int64 in 1..C-1, sorted by score (highest first),
    K <= ``max_detections``. Equal scores may be ordered differently from NVIDIA (both sorts are unstable);
    everything else is NVIDIA's float32 arithmetic, so the detections are NVIDIA's.

    Work, for the whole batch at once: the class maximum of every anchor's logits tells which anchors can
    have a score above the threshold (``p_c > t`` needs ``x_c > max x + ln t``); only their rows are
    soft-maxed (in NVIDIA's [N, A, C] layout, so the scores have NVIDIA's bits). The candidates are sorted
    once by (image, class, score), cut to ``candidates_per_class`` per class, and packed as [G, K] rows, one
    per (image, class) group with a candidate, the rows sorted by candidate count (K = the largest); only
    their boxes are decoded. The pairwise suppression matrix [G, K, K] (bool) is built in chunks of at most
    ``max_pairs`` box pairs, each chunk only as wide as its largest group; :func:`greedy_nms_padded` keeps
    the boxes; one ``topk`` per image picks the best ``max_detections``. Host synchronisations: three
    data-dependent sizes (anchors and candidates above the threshold, candidates per group) and the
    per-image counts at the end (the result is a list of variable-length tensors), plus the checks of the
    ``fixed_point`` NMS.

    Args:
        locs: [N, 4, A] offsets (NVIDIA layout), any float dtype; not modified.
        confs: [N, C, A] class logits; not modified.
        default_boxes: the A default boxes.
        nms_method: see :func:`greedy_nms_padded`.
        max_pairs: box pairs per chunk of the IoU computation (memory bound; default 2**24 on CUDA, 2**21
            elsewhere).
    """
    num_images, num_classes, num_anchors = confs.shape
    classes = num_classes - 1
    device = locs.device
    with torch.autocast(device_type=device.type, enabled=False):
        logits = confs.float().permute(0, 2, 1)  # [N, A, C], NVIDIA's layout
        # Anchors that can have a class score above the threshold: p_c > t needs x_c > max_j x_j + ln t
        # (the softmax denominator is at least exp(max - max) = 1). Only their rows are soft-maxed; each row
        # gets the same bits as in NVIDIA's softmax over [N, A, C] (rows are computed independently).
        if score_threshold > 0:
            margin = -math.log(score_threshold) + 1e-3  # slack >> float32 rounding of the softmax
            best_class = confs[:, 1:].float().amax(dim=1)  # [N, A]
            best = torch.maximum(best_class, confs[:, 0].float())
            row_image, row_anchor = (best_class > best - margin).nonzero(as_tuple=True)  # host sync
        else:
            row_image = torch.arange(num_images, device=device).repeat_interleave(num_anchors)
            row_anchor = torch.arange(num_anchors, device=device).repeat(num_images)
        probs = logits[row_image, row_anchor].softmax(dim=-1)[:, 1:]  # [R, C-1]
        row, cls = (probs > score_threshold).nonzero(as_tuple=True)  # host sync
        if row.numel() == 0 or max_detections <= 0:
            return [_empty(device) for _ in range(num_images)]
        cand_score = probs[row, cls]
        cand_image = row_image[row]
        cand_anchor = row_anchor[row]
        cand_group = cand_image * classes + cls  # (image, class slot)

        # Group the candidates, best first: one stable sort on group + (1 - score) in float64 (exact: the
        # group needs < 30 bits, 1 - score < 30 bits), ties keep the anchor order.
        key = cand_group.double() * 2 + (1 - cand_score.double())
        order = torch.sort(key, stable=True).indices
        cand_score, cand_anchor, cand_group = cand_score[order], cand_anchor[order], cand_group[order]
        counts = torch.bincount(cand_group, minlength=num_images * classes)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(cand_group.numel(), device=device) - starts[cand_group]
        k = min(int(candidates_per_class), num_anchors)

        # Pack the groups as rows of [G, K], rows sorted by candidate count (decreasing).
        counts_host = counts.clamp(max=k).cpu()  # host sync
        group_order = torch.argsort(counts_host, descending=True, stable=True)
        num_groups = int((counts_host > 0).sum())
        group_order = group_order[:num_groups]
        sizes = counts_host[group_order].tolist()
        width = sizes[0]
        groups = group_order.to(device)  # [G] group id of each row
        row_of_group = torch.zeros(num_images * classes, dtype=torch.long, device=device)
        row_of_group[groups] = torch.arange(num_groups, device=device)
        take = (rank < k).nonzero().squeeze(1)
        row_index, col_index = row_of_group[cand_group[take]], rank[take]
        cand_anchor = cand_anchor[take]
        g_scores = torch.full((num_groups, width), -math.inf, device=device)
        g_scores[row_index, col_index] = cand_score[take]
        g_valid = g_scores > -math.inf
        g_image = torch.div(groups, classes, rounding_mode="floor")
        g_class = groups - g_image * classes  # 0-based class slot
        # decode only the candidates' boxes, into [G, K, 4] (padding: zeros)
        anchors = default_boxes.xywh.to(device=device, dtype=torch.float32)
        cand_locs = locs[g_image[row_index], :, cand_anchor].float()  # [M, 4]
        g_boxes = torch.zeros(num_groups, width, 4, device=device)
        g_boxes[row_index, col_index] = decode_boxes(
            cand_locs, anchors[cand_anchor], default_boxes.scale_xy, default_boxes.scale_wh
        )

        # NMS. On the CPU the widest groups go one by one through torchvision's C++ greedy kernel (cheap per
        # call, and it skips suppressed boxes); the rest, and on GPUs every group, by buckets of rows of
        # similar width (at most max_pairs box pairs, widths within 2x) through greedy_nms_padded.
        method = nms_method
        if method == "auto":
            method = "fixed_point" if device.type == "cuda" else "hybrid"
        keep = torch.zeros(num_groups, width, dtype=torch.bool, device=device)
        start = 0
        if method in ("hybrid", "kernel"):
            wide = num_groups if method == "kernel" else sum(1 for n in sizes if n > _KERNEL_MIN_WIDTH)
            threshold = _nms_threshold(iou_threshold)  # torchvision drops IoU > t; NVIDIA IoU >= criteria
            nms = torch.ops.torchvision.nms
            kept = [nms(g_boxes[g, : sizes[g]], g_scores[g, : sizes[g]], threshold) for g in range(wide)]
            if kept:
                rows = torch.repeat_interleave(
                    torch.arange(wide, device=device), torch.tensor([len(k) for k in kept], device=device)
                )
                keep[rows, torch.cat(kept)] = True
            start = wide
            method = "sequential"
        budget = int(max_pairs) if max_pairs else _pair_budget(device)
        while start < num_groups:
            w = sizes[start]
            stop = start + 1
            limit = start + max(1, budget // (w * w))
            while stop < min(num_groups, limit) and 2 * sizes[stop] > w:
                stop += 1
            keep[start:stop, :w] = greedy_nms_padded(
                suppression_matrix(g_boxes[start:stop, :w], iou_threshold),
                g_valid[start:stop, :w],
                method,
                sizes[start:stop],
            )
            start = stop

        # Per image the best max_detections kept boxes: the kept scores go to a dense [N, (C-1) * K] table
        # (column = class slot * K + rank in the class; one cell per group and rank), one topk per row.
        dense = torch.full((num_images, classes * width), -math.inf, device=device)
        column = g_class[:, None] * width + torch.arange(width, device=device)
        dense.index_put_((g_image[:, None].expand_as(column), column), torch.where(keep, g_scores, -math.inf))
        d = min(int(max_detections), classes * width)
        best_scores, best_column = dense.topk(d, dim=1)  # [N, D], sorted
        slot = torch.div(best_column, width, rounding_mode="floor")
        image = torch.arange(num_images, device=device)[:, None]
        best_row = row_of_group[image * classes + slot]  # [N, D] (garbage where nothing was found)
        best_rank = best_column - slot * width
        found = best_scores > -math.inf
        best_row = torch.where(found, best_row, 0)
        best_boxes = g_boxes[best_row, best_rank]  # [N, D, 4]
        labels = slot + 1
        per_image = found.sum(dim=1).tolist()  # host sync
    return [
        {"boxes": best_boxes[n, :m], "scores": best_scores[n, :m], "labels": labels[n, :m]}
        for n, m in enumerate(per_image)
    ]


def _empty(device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros(0, 4, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
    }


# ----------------------------------------------------------------------------------------------------
# Model and optimizer switches
# ----------------------------------------------------------------------------------------------------


def compile_module(
    module: nn.Module, mode: str | None = None, dynamic: bool | None = False, **kwargs: Any
) -> nn.Module:
    """``torch.compile`` ``module`` in place (``nn.Module.compile``) and return it.

    The parameters, buffers and state-dict keys stay those of ``module`` (no ``_orig_mod.`` prefix), so
    checkpoints written from a compiled model load into an eager one. Compilation happens on the first call.

    Args:
        mode: ``None``/``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune``,
            ``max-autotune-no-cudagraphs``.
        dynamic: ``False`` (default) compiles for the shapes seen (a new batch size recompiles once).
    """
    module.compile(mode=None if mode in (None, "default") else mode, dynamic=dynamic, **kwargs)
    return module


def set_optimizer_impl(optimizer: torch.optim.Optimizer, impl: str) -> torch.optim.Optimizer:
    """Switch an existing ``torch.optim`` optimizer (SGD, Adam, AdamW...) to another step kernel.

    Equivalent to having built it with ``foreach=``/``fused=`` (the state, learning rates and schedulers
    are untouched). ``impl``: one of :data:`OPTIMIZER_IMPLS`.
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"fastpath.optimizer={impl!r}: use one of {', '.join(OPTIMIZER_IMPLS)}")
    groups = optimizer.param_groups
    if impl != "auto" and any("fused" not in g or "foreach" not in g for g in groups):
        raise ValueError(
            f"fastpath.optimizer={impl}: {type(optimizer).__name__} has no foreach/fused implementations"
        )
    foreach, fused = {
        "auto": (None, None),
        "foreach": (True, False),
        "fused": (False, True),
        "loop": (False, False),
    }[impl]
    for group in groups:
        if "foreach" in group:
            group["foreach"] = foreach
        if "fused" in group:
            group["fused"] = fused
    if fused:
        # what the constructor does for fused=True: the kernel unscales and skips on inf itself
        optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]
        optimizer._need_device_dtype_check_for_fused = True  # type: ignore[attr-defined]
    elif hasattr(optimizer, "_step_supports_amp_scaling"):
        optimizer._step_supports_amp_scaling = False  # type: ignore[attr-defined]
    return optimizer


def set_backend_flags(cudnn_benchmark: bool | None = None, matmul_precision: str | None = None) -> None:
    """``torch.backends.cudnn.benchmark`` and ``torch.set_float32_matmul_precision`` (None: leave as is)."""
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if matmul_precision:
        torch.set_float32_matmul_precision(str(matmul_precision))


# ----------------------------------------------------------------------------------------------------
# Host synchronisation accounting
# ----------------------------------------------------------------------------------------------------


def _devices(args: Iterable[Any]) -> set[str]:
    out = set()
    for a in args:
        if isinstance(a, torch.Tensor):
            out.add(a.device.type)
        elif isinstance(a, (list, tuple)):
            out |= _devices(a)
    return out


def _has_bool(args: Iterable[Any]) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and a.dtype == torch.bool:
            return True
        if isinstance(a, (list, tuple)) and _has_bool(a):
            return True
    return False


class HostSyncCounter(TorchDispatchMode):
    """Count the operations that make the host wait for the device, while active (``with`` block).

    Counted: ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``; also what
    ``.tolist()`` and ``nonzero`` need), copies between a non-CPU device and the CPU that are not
    ``non_blocking`` (``.cpu()``, ``.to("cuda")`` of a pageable tensor, ``torch.tensor(x, device="cuda")``),
    and ops whose output size depends on device data (``nonzero``, ``masked_select``, ``x[mask]``...). On the
    CPU the copies do not exist (nor can ``torch.tensor(x)`` on the module's device be told from an ordinary
    CPU tensor), so only the scalar reads and data-dependent shapes count there; they are the same calls that
    synchronise on a GPU.

    ``host_reads=False`` leaves out scalar reads of CPU tensors (on a GPU run they cost nothing; on a CPU-only
    run keep them: they are the reads that would synchronise if the tensor lived on the GPU, an upper bound
    since some values, like a host copy of the loss, stay on the host in a GPU run too).

    ``counts`` maps an op name to its count; ``total`` sums them. With ``trace=True``, ``where`` maps
    ``"op at file:line < file:line ..."`` (the four innermost callers outside torch, one per file) to its
    count.
    """

    _DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "bincount", "repeat_interleave"}

    def __init__(self, trace: bool = False, host_reads: bool = True) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.where: dict[str, int] = {}
        self.trace = bool(trace)
        self.host_reads = bool(host_reads)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _add(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.trace:
            import traceback

            sites: list[str] = []
            seen: set[str] = set()
            for frame in reversed(traceback.extract_stack()[:-2]):
                if f"{os.sep}torch{os.sep}" in frame.filename or frame.filename in seen:
                    continue
                seen.add(frame.filename)
                sites.append(f"{os.path.basename(frame.filename)}:{frame.lineno}")
            key = f"{name} at {' < '.join(sites[:4]) or '?'}"
            self.where[key] = self.where.get(key, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            if self.host_reads or args[0].device.type != "cpu":
                self._add("item")
        elif name == "lift_fresh" and args and args[0].device.type != "cpu":
            self._add("host_device_copy")  # torch.tensor(x, device=<accelerator>): a blocking copy
        elif name in self._DATA_DEPENDENT:
            self._add(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_bool(args[1:2]):
            self._add("boolean_mask")  # x[mask], x[mask] = v: the mask's nonzero is read on the host
        elif name in ("_to_copy", "copy_") and not kwargs.get("non_blocking", False):
            devices = _devices(args)
            target = kwargs.get("device")
            if target is not None:
                devices.add(torch.device(target).type)
            if "cpu" in devices and len(devices) > 1:
                self._add("host_device_copy")
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Lightning callback
# ----------------------------------------------------------------------------------------------------


class FastPathCallback(pl.Callback):
    """Switch on parts of the fast path for a Lightning run of :class:`~ssd_lightning.module.SSDModule`.

    (channels_last is the module's own ``channels_last`` argument; AMP is ``trainer.precision``; DALI on the
    GPU is ``data.device``; cuDNN autotuning is also ``trainer.benchmark``.)

    Args:
        compile: ``torch.compile`` the network (``pl_module.model``), in place, at ``setup``.
        compile_loss: also compile the loss (``pl_module.loss``).
        compile_mode: ``default``, ``reduce-overhead``, ``max-autotune``...
        optimizer: SGD step kernel, one of :data:`OPTIMIZER_IMPLS` (``auto``: leave PyTorch's choice).
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` (None: leave it).
        matmul_precision: ``torch.set_float32_matmul_precision`` (``high`` allows TF32; None: leave it).
    """

    def __init__(
        self,
        compile: bool = False,
        compile_loss: bool = False,
        compile_mode: str | None = None,
        optimizer: str = "auto",
        cudnn_benchmark: bool | None = None,
        matmul_precision: str | None = None,
    ) -> None:
        if optimizer not in OPTIMIZER_IMPLS:
            raise ValueError(f"fastpath.optimizer={optimizer!r}: use one of {', '.join(OPTIMIZER_IMPLS)}")
        self.compile = bool(compile)
        self.compile_loss = bool(compile_loss)
        self.compile_mode = compile_mode
        self.optimizer = optimizer
        self.cudnn_benchmark = cudnn_benchmark
        self.matmul_precision = matmul_precision

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        set_backend_flags(self.cudnn_benchmark, self.matmul_precision)
        if self.compile and hasattr(pl_module, "model"):
            compile_module(pl_module.model, self.compile_mode)
        if self.compile_loss and hasattr(pl_module, "loss"):
            compile_module(pl_module.loss, self.compile_mode)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.optimizer == "auto":
            return
        for optimizer in trainer.optimizers:
            set_optimizer_impl(optimizer, self.optimizer)
