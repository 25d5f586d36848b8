"""Category maps: the model's contiguous labels 1..K and the data set's own category ids and names.

One class, :class:`CategoryMap`, serves the data module (built from an annotation file's ``categories``) and
the inference tools (built from a checkpoint: :func:`ssd_lightning.checkpoints.checkpoint_categories`), plus
the COCO 2017 ids and names that NVIDIA's 81-class checkpoints stand for without naming them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["COCO2017_CATEGORY_IDS", "COCO2017_CLASS_NAMES", "CategoryMap"]


class CategoryMap:
    """Two-way map between the model's contiguous labels and the dataset's own category ids.

    Label 0 is background; label ``i`` (1..K) is the dataset category ``dataset_ids[i - 1]``, in the order the
    categories are listed in the annotation file (the order DALI's ``readers.coco`` remaps them in).

    Attributes:
        dataset_ids: list of K dataset category ids (any integers, e.g. COCO's 1..90 with gaps).
        names: list of K category names.
    """

    def __init__(self, dataset_ids: Sequence[int], names: Sequence[str] | None = None) -> None:
        self.dataset_ids: list[int] = [int(i) for i in dataset_ids]
        self.names: list[str] = (
            [str(n) for n in names] if names is not None else [str(i) for i in self.dataset_ids]
        )
        if len(self.names) != len(self.dataset_ids):
            raise ValueError("dataset_ids and names must have the same length")
        if len(set(self.dataset_ids)) != len(self.dataset_ids):
            raise ValueError(f"duplicate category ids in {self.dataset_ids}")
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.dataset_ids)}

    @classmethod
    def from_categories(cls, categories: Sequence[dict]) -> CategoryMap:
        """From a COCO ``categories`` list (order kept)."""
        return cls([c["id"] for c in categories], [c.get("name", str(c["id"])) for c in categories])

    @property
    def num_classes(self) -> int:
        """K + 1 (background included): the model's ``num_classes``."""
        return len(self.dataset_ids) + 1

    def __len__(self) -> int:
        return len(self.dataset_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CategoryMap):
            return NotImplemented
        return self.dataset_ids == other.dataset_ids and self.names == other.names

    def __repr__(self) -> str:
        pairs = ", ".join(f"{i + 1}:{cid}" for i, cid in enumerate(self.dataset_ids[:8]))
        more = ", ..." if len(self) > 8 else ""
        return f"CategoryMap(K={len(self)}, label:id {{{pairs}{more}}})"

    def to_dataset_id(self, labels: torch.Tensor) -> torch.Tensor:
        """Map contiguous labels (1..K, any shape, integer) to dataset category ids (int64, same shape).

        Label 0 (background) maps to -1. Raises ``ValueError`` on labels outside 0..K.
        """
        labels = torch.as_tensor(labels)
        table = torch.tensor([-1, *self.dataset_ids], dtype=torch.int64, device=labels.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > len(self)):
            raise ValueError(
                f"labels must be in 0..{len(self)}, got {int(labels.min())}..{int(labels.max())}"
            )
        return table[labels.long()]

    def to_label(self, dataset_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Map dataset category ids (any shape) to contiguous labels 1..K (int64). Raises on unknown ids."""
        ids = torch.as_tensor(dataset_ids)
        try:
            out = [self._label_of[int(i)] for i in ids.flatten().tolist()]
        except KeyError as e:
            raise ValueError(f"unknown dataset category id {e.args[0]}; known: {self.dataset_ids}") from None
        return torch.tensor(out, dtype=torch.int64, device=ids.device).reshape(ids.shape)

    def coco(self) -> list[dict[str, Any]]:
        """COCO ``categories`` entries (``{"id", "name"}`` in label order)."""
        return [{"id": i, "name": n} for i, n in zip(self.dataset_ids, self.names, strict=True)]

    def as_dict(self) -> dict[str, list]:
        """Plain-types form for checkpoints: ``{"category_ids": [...], "class_names": [...]}``."""
        return {"category_ids": list(self.dataset_ids), "class_names": list(self.names)}


#: The 80 COCO 2017 category ids in sorted order (1..90 with gaps): the dataset ids of labels 1..80 of an
#: 81-class model whose checkpoint does not name them (NVIDIA's checkpoints).
COCO2017_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
    *range(84, 91),
)  # fmt: skip


#: COCO 2017 category names in the order of :data:`COCO2017_CATEGORY_IDS`.
COCO2017_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
