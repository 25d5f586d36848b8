"""An SSD300 ONNX file written by ``export.py``, run with onnxruntime as :meth:`SSD300.forward` runs.

The file holds the network only (input ``images [N,3,300,300]`` float32, ImageNet-normalised; outputs
``locs [N,4,8732]`` and ``confs [N,C,8732]``; ``N`` dynamic) and, in its ``metadata_props``, what the
post-processing and the results need: ``backbone``, ``num_classes`` and the JSON lists ``category_ids`` and
``class_names`` (labels 1..C-1). See :data:`METADATA_KEYS`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ssd_lightning.categories import CategoryMap
from ssd_lightning.errors import CheckpointError, ConfigError

__all__ = ["METADATA_KEYS", "OnnxSSD300", "is_onnx_file"]

#: the metadata_props that predict.py reads (export.py writes these and a few descriptive ones)
METADATA_KEYS = ("backbone", "num_classes", "category_ids", "class_names")


def is_onnx_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ONNX model (by its ``.onnx`` suffix)."""
    return Path(path).suffix.lower() == ".onnx"


def _ort() -> Any:
    try:
        import onnxruntime  # lazy: optional (pip install onnxruntime), needed for ONNX files only
    except ImportError:
        raise ConfigError(
            "running an ONNX file needs the onnxruntime package: pip install onnxruntime"
        ) from None
    return onnxruntime


class OnnxSSD300:
    """``OnnxSSD300(path)(images) -> (locs, confs)``: the ONNX file's network on onnxruntime.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers; None: CUDA when asked for by ``device`` and available,
            else the CPU.
        device: where the caller's tensors live (results are returned there).

    Raises:
        CheckpointError: a missing file or one onnxruntime cannot load.
    """

    def __init__(
        self, path: str | os.PathLike, providers: list[str] | None = None, device: str = "cpu"
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        self.device = torch.device(device)
        self.providers = providers or self._default_providers()
        self._session: Any = None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def _default_providers(self) -> list[str]:
        available = _ort().get_available_providers()
        if self.device.type == "cuda" and "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    @property
    def session(self) -> Any:
        """The onnxruntime ``InferenceSession`` (created on first use, in the process that uses it)."""
        if self._session is None:
            ort = _ort()
            options: dict[str, Any] = {}
            if self.providers[0] == "CUDAExecutionProvider":
                options = {"provider_options": [{"device_id": self.device.index or 0}, {}]}
            try:
                self._session = ort.InferenceSession(str(self.path), providers=self.providers, **options)
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
                reason = " ".join(str(err).split())[:300]
                raise CheckpointError(
                    f"{self.path}: onnxruntime cannot load it as a model ({reason})"
                ) from None
        return self._session

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}  # a session does not pickle: the receiver makes its own

    def _meta(self, key: str) -> Any:
        if key not in self.metadata:
            raise CheckpointError(
                f"{self.path}: the ONNX file has no '{key}' in its metadata (class ids and names): export it "
                "with python export.py ckpt_path=CHECKPOINT format=onnx"
            )
        value = self.metadata[key]
        return value if key == "backbone" else json.loads(value)

    @property
    def backbone(self) -> str:
        return str(self._meta("backbone"))

    @property
    def num_classes(self) -> int:
        return int(self._meta("num_classes"))

    @property
    def categories(self) -> CategoryMap:
        """Labels 1..C-1 as the exporting checkpoint had them (ids and names from the metadata)."""
        ids, names = self._meta("category_ids"), self._meta("class_names")
        if len(ids) != self.num_classes - 1 or len(names) != len(ids):
            raise CheckpointError(
                f"{self.path}: metadata for {self.num_classes} classes but {len(ids)} category ids and "
                f"{len(names)} class names: the file is inconsistent"
            )
        return CategoryMap(ids, names)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` float ``[N,3,300,300]`` -> ``(locs [N,4,8732], confs [N,C,8732])`` float32 on
        ``images.device``."""
        feed = {"images": images.detach().float().cpu().contiguous().numpy()}
        locs, confs = self.session.run(["locs", "confs"], feed)
        return torch.from_numpy(locs).to(images.device), torch.from_numpy(confs).to(images.device)
