"""The fast path: in-place ``torch.compile``, optimizer kernels, host-sync accounting and the Lightning
callback that switches them on for a training run.

Every piece is optional and switched from config (``conf/benchmark.yaml``, ``fastpath.*``); with all of them
off the project computes exactly what it computes without this module. (The batched post-processing, the
other half of the fast path, is always on: :func:`ssd_lightning.postprocess.postprocess`, its NMS method
switched by ``fastpath.nms_method``.) What each switch does:

* :func:`compile_module`: ``nn.Module.compile`` in place (state-dict keys unchanged, checkpoints stay
  loadable).
* :func:`set_optimizer_impl`: pick ``torch.optim.SGD``'s for-loop, ``foreach`` or ``fused`` kernel on an
  optimizer that already exists (Lightning builds it in ``configure_optimizers``). ``fused`` also lets the
  fp16 ``GradScaler`` pass its scale and inf flag to the kernel instead of reading the inf flag on the host
  every step.
* :class:`HostSyncCounter`: counts the operations that make the host wait for the device (``.item()``,
  ``bool(tensor)``, ``.tolist()``, ``.cpu()``, blocking host<->device copies, ``torch.distributed.barrier``)
  while it is active.
* :class:`HostCopy`: a device tensor copied to the host without waiting; read once the copy has landed.
* :class:`FastPathCallback`: applies compile / optimizer kernel / cuDNN autotuning / matmul precision to a
  Lightning run of :class:`~ssd_lightning.training.module.SSDModule`.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ssd_lightning.training.clipping import check_fused_clipping

__all__ = [
    "OPTIMIZER_IMPLS",
    "FastPathCallback",
    "HostCopy",
    "HostSyncCounter",
    "compile_module",
    "set_optimizer_impl",
]

log = logging.getLogger(__name__)

#: ``torch.optim`` step implementations: ``auto`` (PyTorch's default: foreach when every parameter is on a
#: CUDA device, else the for-loop), ``foreach`` (multi-tensor kernels), ``fused`` (one fused kernel per
#: device/dtype; CPU and CUDA), ``loop`` (one kernel per parameter).
OPTIMIZER_IMPLS: tuple[str, ...] = ("auto", "foreach", "fused", "loop")


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


def _stack() -> list[traceback.FrameSummary]:
    """The Python stack without the counter's own frames."""
    return [f for f in traceback.extract_stack() if f.filename != __file__]


def _in_progress_bar_conversion() -> bool:
    """Whether Lightning (2.6) is turning the logged progress-bar values into numbers
    (``_ResultCollection.metrics``: ``metrics["pbar"][name] = convert_tensors_to_scalars(value)``)."""
    return any(
        f.filename.endswith(os.path.join("logger_connector", "result.py")) and '"pbar"' in (f.line or "")
        for f in _stack()
    )


class _TolistCounter(TorchFunctionMode):
    """``Tensor.tolist`` calls (on the CPU they read memory directly, below the dispatcher)."""

    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if func is torch.Tensor.tolist and args and (self.counter.host_reads or args[0].device.type != "cpu"):
            self.counter._add("tolist")
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchDispatchMode):
    """Count the operations that make the host wait for the device, while active (``with`` block).

    Counted: ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``; also what
    ``nonzero`` needs), ``Tensor.tolist()``, copies between a non-CPU device and the CPU that are not
    ``non_blocking`` (``.cpu()``, ``.to("cuda")`` of a pageable tensor, ``torch.tensor(x, device="cuda")``),
    ops whose output size depends on device data (``nonzero``, ``masked_select``, ``x[mask]``...) and calls
    of ``torch.distributed.barrier`` (``barrier``; Lightning's ``strategy.reduce`` makes one before each
    all-reduce). On the CPU the copies do not exist (nor can ``torch.tensor(x)`` on the module's device be
    told from an ordinary CPU tensor), so only the scalar reads, ``tolist``, data-dependent shapes and
    barriers count there; they are the same calls that synchronise on a GPU. Not counted: reading a
    :class:`HostCopy` that has landed (it never waits).

    ``host_reads=False`` leaves out scalar reads of CPU tensors (on a GPU run they cost nothing; on a CPU-only
    run keep them: they are the reads that would synchronise if the tensor lived on the GPU, an upper bound
    since some values, like a host copy of the loss, stay on the host in a GPU run too).

    Lightning reads every progress-bar value with ``.item()`` after every batch; the module gives it a host
    copy of the loss (:class:`HostCopy`), a free read. Such reads of CPU tensors are counted apart, as
    ``progress_bar_host_read`` (on a CPU-only run every tensor is a CPU tensor, so this also hides a device
    tensor logged to the bar; on a GPU run a device tensor there counts as ``item``).

    ``counts`` maps an op name to its count; ``total`` sums them; ``blocking`` leaves out
    ``progress_bar_host_read``; ``project`` counts those whose innermost caller outside torch is this package
    (``ssd_lightning``), not a library. With ``trace=True``, ``where`` maps ``"op at file:line < file:line
    ..."`` (the four innermost callers outside torch, one per file) to its count.
    """

    _DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "bincount", "repeat_interleave"}
    _PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def __init__(self, trace: bool = False, host_reads: bool = True) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.where: dict[str, int] = {}
        self.project = 0
        self.trace = bool(trace)
        self.host_reads = bool(host_reads)
        self._tolist = _TolistCounter(self)
        self._barrier: Any = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def blocking(self) -> int:
        return self.total - self.counts.get("progress_bar_host_read", 0)

    def __enter__(self) -> HostSyncCounter:
        super().__enter__()
        self._tolist.__enter__()
        barrier = self._barrier = dist.barrier

        def counted_barrier(*args: Any, **kwargs: Any) -> Any:
            self._add("barrier")
            return barrier(*args, **kwargs)

        dist.barrier = counted_barrier
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.barrier = self._barrier
        self._tolist.__exit__(*exc)
        super().__exit__(*exc)

    def _add(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        callers = [f for f in reversed(_stack()) if f"{os.sep}torch{os.sep}" not in f.filename]
        if callers and callers[0].filename.startswith(self._PACKAGE + os.sep):
            self.project += 1
        if self.trace:
            sites: list[str] = []
            seen: set[str] = set()
            for frame in callers:
                if frame.filename in seen:
                    continue
                seen.add(frame.filename)
                sites.append(f"{os.path.basename(frame.filename)}:{frame.lineno}")
            key = f"{name} at {' < '.join(sites[:4]) or '?'}"
            self.where[key] = self.where.get(key, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            if args[0].device.type == "cpu" and _in_progress_bar_conversion():
                self._add("progress_bar_host_read")
            elif self.host_reads or args[0].device.type != "cpu":
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


class HostCopy:
    """``tensor``'s values copied to the host without making the host wait for the device.

    On an accelerator: an asynchronous copy into pinned host memory and an event recorded after it;
    :meth:`ready` says whether it has landed, :meth:`tolist` reads it (waiting only if it has not). On the
    CPU: a copy, ready at once. The values are read through numpy: a landed copy is plain host memory, so
    :class:`HostSyncCounter` does not count the read.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._event: Any = None
        if tensor.device.type == "cpu":
            self._host = tensor.clone()
        else:
            self._host = tensor.to("cpu", non_blocking=True)  # pinned, asynchronous
            self._event = torch.Event(tensor.device)
            self._event.record()

    def ready(self) -> bool:
        return self._event is None or bool(self._event.query())

    def tolist(self) -> list[Any]:
        """The values (``tensor.tolist()``), after the copy has landed."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy().tolist()


# ----------------------------------------------------------------------------------------------------
# Lightning callback
# ----------------------------------------------------------------------------------------------------


class FastPathCallback(pl.Callback):
    """Switch on parts of the fast path for a Lightning run of
    :class:`~ssd_lightning.training.module.SSDModule`.

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
        check_fused_clipping(trainer)
