"""What DALI's ``readers.coco`` reads instead of the JSON file: its preprocessed annotation files.

``readers.coco(preprocessed_annotations=DIR)`` loads flat binary files (the format of its own
``save_preprocessed_annotations``, DALI 2.4) instead of parsing the annotation JSON, and reads the images in
the order of ``filenames.dat``. Written here from an :class:`~ssd_lightning.data.index.AnnotationIndex` for
any selection and order of images (one epoch's shard), they replace the JSON parse of every pipeline build
(about 2 s for a COCO-sized file) by a few milliseconds, and the per-epoch ``images=`` list as well.

Each ``*.dat`` file is a little-endian ``uint32`` count followed by that many ``int32`` or ``float32`` values;
``filenames.dat`` is one file name per line (DALI splits it on whitespace, so names with spaces cannot go
this way: :func:`can_use_preprocessed` says so, and the pipelines then use the JSON file).

The values are the ones DALI's JSON parser computes (``ratio=True, ltrb=True``): the box read as float32,
``right = x + w`` and ``bottom = y + h`` added in float32, each coordinate divided in float32 by the image's
width or height; labels 1..K by the category's place in the file; crowd boxes left out unless
``include_crowd``. The tests compare both ways batch by batch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ssd_lightning.data.index import AnnotationIndex, group_ranks

__all__ = ["built_pipeline", "can_use_preprocessed", "dali_boxes", "write_preprocessed_annotations"]


def can_use_preprocessed(index: AnnotationIndex) -> bool:
    """Whether DALI can read ``index``'s file names from ``filenames.dat`` (no whitespace in any)."""
    return not np.isin(index.name_blob, np.frombuffer(b" \t\n\r\v\f", dtype=np.uint8)).any()


def dali_boxes(xywh: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """[M, 4] relative ltrb float32, as DALI's COCO parser computes them from [M, 4] xywh pixel boxes and the
    [M, 2] (width, height) of their images."""
    box = xywh.astype(np.float32)
    right, bottom = box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]  # float32 additions
    width, height = sizes[:, 0].astype(np.float32), sizes[:, 1].astype(np.float32)
    return np.stack([box[:, 0] / width, box[:, 1] / height, right / width, bottom / height], axis=1)


def _write(path: Path, values: np.ndarray, dtype: type) -> None:
    data = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
    with open(path, "wb") as f:
        f.write(np.uint32(data.size).astype("<u4").tobytes())
        f.write(data.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())


def write_preprocessed_annotations(
    index: AnnotationIndex, positions: np.ndarray, out_dir: str | os.PathLike, include_crowd: bool = True
) -> Path:
    """Write DALI's preprocessed annotation files for the images at ``positions`` (in that order) into
    ``out_dir``; returns it. Every listed image is read, also one without boxes (the caller selects)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    positions = np.asarray(positions, dtype=np.int64)
    ann, first, count = index.annotations_by_image(include_crowd)
    counts = count[positions]
    chosen = ann[np.repeat(first[positions], counts) + group_ranks(counts)]
    sizes = index.raw_sizes[index.ann_image[chosen]]
    _write(out / "boxes.dat", dali_boxes(index.ann_box[chosen], sizes), np.float32)
    _write(out / "labels.dat", index.ann_label[chosen], np.int32)
    _write(out / "counts.dat", counts, np.int32)
    _write(out / "offsets.dat", np.cumsum(counts) - counts, np.int32)
    _write(out / "original_ids.dat", index.image_ids[positions], np.int32)
    (out / "filenames.dat").write_bytes(index.file_name_lines(positions))
    return out


def built_pipeline(
    ann: AnnotationIndex, positions: np.ndarray, crowd: bool, make: Callable[..., Any], **kwargs: Any
) -> Any:
    """``make(**kwargs)`` (a function of :mod:`~ssd_lightning.data.pipelines`) reading the images at
    ``positions`` of ``ann`` in that order (crowd boxes included when ``crowd``), built: from preprocessed
    annotation files written for them into a temporary folder (removed once DALI has read them), or, when
    a file name has whitespace, from the JSON file with the ``images`` list."""
    if not can_use_preprocessed(ann):
        pipe = make(file_names=ann.file_names_at(positions), **kwargs)
        pipe.build()
        return pipe
    with tempfile.TemporaryDirectory(prefix="ssd_lightning_reader_") as folder:
        write_preprocessed_annotations(ann, positions, folder, include_crowd=crowd)
        pipe = make(preprocessed_annotations=folder, **kwargs)
        pipe.build()  # DALI reads the files here
    return pipe
