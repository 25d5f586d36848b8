"""Where a split's images and annotation file are: ``data.root`` in either COCO layout, or per-split paths.

``root/images/{split}2017`` + ``root/annotations/instances_{split}2017.json`` (the layout of the project this
one rebuilds) or the plain COCO layout ``root/{split}2017``; ``data.{split}_{images,annotations}`` override
each path. Every miss is a one-line :class:`~ssd_lightning.errors.DataError` naming the path and the key.
"""

from __future__ import annotations

import os
from pathlib import Path

from ssd_lightning.errors import DataError

__all__ = ["LAYOUT_HINT", "check_root", "resolve_split_paths"]

LAYOUT_HINT = (
    "expected root/images/{train2017,val2017} + root/annotations/instances_{train,val}2017.json "
    "or root/{train2017,val2017,annotations}"
)


def _as_path(p: str | os.PathLike | None, base: Path | None) -> Path | None:
    if p is None or str(p) == "":
        return None
    path = Path(os.path.expanduser(str(p)))
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def check_root(root: str | os.PathLike | None) -> Path | None:
    """Check that ``data.root`` exists and is a non-empty folder (``None`` passes: per-split paths only)."""
    if root is None or str(root) == "":
        return None
    path = Path(os.path.expanduser(str(root)))
    if not path.exists():
        raise DataError(
            f"data.root {path} does not exist; set data.root=DIR to a COCO-format folder ({LAYOUT_HINT})"
        )
    if not path.is_dir():
        raise DataError(f"data.root {path} is not a folder; set data.root=DIR to a COCO-format folder")
    if not any(path.iterdir()):
        raise DataError(f"data.root {path} is empty; put a COCO-format dataset there ({LAYOUT_HINT})")
    return path


def resolve_split_paths(
    root: str | os.PathLike | None,
    split: str,
    images: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Find the image folder and annotation file of ``split`` ("train" or "val").

    Without overrides: ``root/images/{split}2017`` or ``root/{split}2017``, and
    ``root/annotations/instances_{split}2017.json``. Relative overrides are relative to ``root`` (to the
    working directory when ``root`` is not set). Raises :class:`DataError` naming what is missing and the key
    to set.
    """
    base = check_root(root)
    image_dir = _as_path(images, base)
    ann_file = _as_path(annotations, base)
    if base is None and (image_dir is None or ann_file is None):
        raise DataError(
            f"data.root is not set; set data.root=DIR "
            f"(or both data.{split}_images and data.{split}_annotations)"
        )
    if image_dir is None:
        candidates = [base / "images" / f"{split}2017", base / f"{split}2017"]
        image_dir = next((c for c in candidates if c.is_dir()), None)
        if image_dir is None:
            raise DataError(
                f"no {split} image folder in {base} (looked for images/{split}2017 and {split}2017); "
                f"set data.{split}_images=DIR or use the layout {LAYOUT_HINT}"
            )
    elif not image_dir.is_dir():
        raise DataError(f"{split} image folder {image_dir} does not exist; fix data.{split}_images")
    if ann_file is None:
        ann_file = base / "annotations" / f"instances_{split}2017.json"
        if not ann_file.is_file():
            raise DataError(
                f"{split} annotation file {ann_file} not found; set data.{split}_annotations=FILE "
                f"or use the layout {LAYOUT_HINT}"
            )
    elif not ann_file.is_file():
        raise DataError(f"{split} annotation file {ann_file} not found; fix data.{split}_annotations")
    return image_dir, ann_file
