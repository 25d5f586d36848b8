"""ssd_lightning: NVIDIA SSD300 v1.1 as a PyTorch Lightning + Hydra project fed by NVIDIA DALI."""

__all__ = ["load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import ssd_lightning.data` does not build the model stack.
    if name == "load_model":
        from ssd_lightning.checkpoints import load_model

        return load_model
    raise AttributeError(f"module 'ssd_lightning' has no attribute {name!r}")
