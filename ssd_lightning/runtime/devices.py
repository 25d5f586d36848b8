"""Which torch device a script runs on, for the tools that run a model outside Lightning's Trainer.

One rule for ``predict.py device=...`` and ``benchmark.py trainer.accelerator=...``: ``auto`` is the
accelerator Lightning would pick (CUDA, else Apple MPS, else the CPU); ``gpu`` is CUDA; a torch device name
(``cpu``, ``cuda``, ``cuda:1``, ``mps``) is taken as it is, after checking that it exists.
"""

from __future__ import annotations

import torch

from ssd_lightning.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str | None, key: str = "device") -> torch.device:
    """The device ``name`` stands for (see the module docstring); ``key`` names the config key in errors.

    Raises:
        ConfigError: not a device name, or CUDA asked for where none is visible.
    """
    text = str(name or "auto").lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if text == "gpu":
        text = "cuda"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={name}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but no CUDA device is visible: use {key}=auto or {key}=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
