"""Images in and out of the model outside DALI: reading files, the validation preprocessing, drawing boxes.

The preprocessing equals the DALI validation pipeline's (squash-resize to 300x300, ImageNet normalisation):
its constants live here and the DALI graphs read them from here.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from ssd_lightning.boxes import FIG_SIZE
from ssd_lightning.categories import CategoryMap

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_SIZE",
    "draw_detections",
    "preprocess",
    "read_image",
    "squash_resize",
]

#: the network's input side in pixels (SSD300)
INPUT_SIZE = FIG_SIZE
#: ImageNet channel statistics (RGB, of images scaled to 0..1): the normalisation of every pipeline
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to RGB: uint8 ``[3, H, W]``.

    Any mode PIL reads is converted to RGB (grayscale, palette, CMYK; alpha is dropped as DALI drops it;
    16-bit grayscale scaled to 8 bits). EXIF orientation is not applied (as the validation pipeline). Raises
    PIL's or the OS's error for a file that is not a readable image.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            gray = np.asarray(img).astype(np.float64) / 257.0
            rgb = np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        else:
            rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def squash_resize(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[(N,) 3, H, W]`` -> uint8 ``[(N,) 3, 300, 300]``: the picture the network sees (bilinear,
    antialiased, aspect ratio not kept), before the normalisation of :func:`preprocess`."""
    if images.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 RGB images, got {images.dtype}")
    return F.resize(
        images, [INPUT_SIZE, INPUT_SIZE], interpolation=F.InterpolationMode.BILINEAR, antialias=True
    )


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """The validation preprocessing: uint8 RGB ``[(N,) 3, H, W]`` -> float32 ``[(N,) 3, 300, 300]``.

    Squash-resize to 300x300 (bilinear, antialiased, rounded to uint8 as DALI's resize of a uint8 image), then
    ``(x / 255 - mean) / std`` with the ImageNet mean/std of the DALI pipelines.
    """
    resized = squash_resize(images)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (resized.float() / 255.0 - mean) / std


def _palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct saturated colours (golden-angle hues)."""
    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0))
        for i in range(count)
    ]  # type: ignore[misc]


def draw_detections(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[int],
    scores: Sequence[float] | None,
    categories: CategoryMap,
) -> torch.Tensor:
    """``image`` (uint8 ``[3, H, W]``) with ``boxes`` (``[K, 4]`` ltrb pixels) drawn, captioned
    ``<class name> <score>`` (``<class name>`` alone when ``scores`` is None, e.g. ground truth), one colour
    per class (label 1..C-1)."""
    if len(boxes) == 0:
        return image
    palette = _palette(len(categories.names))
    names = [categories.names[int(c) - 1] for c in labels]
    if scores is None:
        captions = names
    else:
        captions = [f"{name} {float(s):.2f}" for name, s in zip(names, scores, strict=True)]
    colors = [palette[int(c) - 1] for c in labels]
    width = max(1, round(max(image.shape[1:]) / 300))
    return draw_bounding_boxes(
        image, boxes, labels=captions, colors=colors, width=width, fill_labels=True, label_colors="black"
    )
