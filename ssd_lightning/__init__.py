"""ssd_lightning: NVIDIA SSD300 v1.1 as a PyTorch Lightning + Hydra project fed by NVIDIA DALI.

The layers, lowest first, and what each may import: ``docs/ARCHITECTURE.md``.
"""

__all__ = ["load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # PEP 562, lazy: `import ssd_lightning.runtime.entry` (every script, before Hydra has composed the config)
    # must not pay for torch, torchvision and Lightning; `ssd_lightning.load_model` loads them on first use.
    if name == "load_model":
        from ssd_lightning.checkpoints import load_model

        return load_model
    raise AttributeError(f"module 'ssd_lightning' has no attribute {name!r}")
