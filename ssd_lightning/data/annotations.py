"""COCO annotation files: read, validate and repair before any DALI pipeline is built.

DALI (2.4) reports bad annotations badly: unknown category ids become label 0 (background) silently, boxes
with non-positive size are dropped silently, a box that reaches outside its image by a float ulp aborts
``random_bbox_crop`` with a C++ assertion. So:

* structural problems (malformed JSON, missing keys, duplicate ids, bad image sizes) raise a one-line
  :class:`~ssd_lightning.errors.DataError` naming the file/annotation and the fix;
* bad annotations that can be dropped or repaired without losing anything the user needs (unknown category or
  image ids, zero/negative/non-finite boxes, boxes reaching outside the image) are dropped or clipped in a
  repaired copy of the annotation file that the DALI reader reads, with one
  :class:`~ssd_lightning.errors.DataWarning` summarising the counts and naming the file.

Box formats: COCO annotation boxes are ``[x, y, w, h]`` in pixels of the original image.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssd_lightning.categories import CategoryMap
from ssd_lightning.data.annotation_columns import annotation_columns, plain_mask
from ssd_lightning.data.coco_json import collector_paused, load_coco_document
from ssd_lightning.errors import DataError, DataWarning
from ssd_lightning.fileio import write_json_atomic

__all__ = [
    "CocoAnnotations",
    "SanitiseReport",
    "read_annotations",
    "warn_sanitised",
    "write_reader_annotations",
]

# DALI's readers.coco drops boxes narrower or lower than this many pixels (its `size_threshold`); we drop them
# in the sanitised copy instead so that the image counts we compute equal what the reader yields.
MIN_BOX_SIZE = 0.1
_SANITISE_VERSION = "1"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Category map


# ----------------------------------------------------------------------------------------------------
# Layout


# ----------------------------------------------------------------------------------------------------
# Annotations


@dataclass
class SanitiseReport:
    """Counts of what sanitising changed; ``examples`` holds a few annotation ids per kind."""

    unknown_category: int = 0
    unknown_image: int = 0
    non_finite: int = 0
    degenerate: int = 0
    outside: int = 0
    clipped: int = 0
    repaired: int = 0  # boxes over the edge by float noise only (< 0.5 px): fixed without a warning
    no_area: int = 0  # kept annotations without 'area' (bbox-only exporters): evaluation takes w x h
    examples: dict[str, list] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.unknown_category + self.unknown_image + self.non_finite + self.degenerate + self.outside

    @property
    def changed(self) -> bool:
        return self.dropped + self.clipped > 0

    def note(self, kind: str, example) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 3:
            ex.append(example)

    def summary(self) -> str:
        def eg(kind: str) -> str:
            return f" (e.g. {', '.join(map(str, self.examples.get(kind, [])))})"

        parts = []
        if self.unknown_category:
            parts.append(
                f"{self.unknown_category} with a category id not in 'categories'{eg('unknown_category')}"
            )
        if self.unknown_image:
            parts.append(f"{self.unknown_image} with an image id not in 'images'{eg('unknown_image')}")
        if self.non_finite:
            parts.append(f"{self.non_finite} with non-finite box values{eg('non_finite')}")
        if self.degenerate:
            parts.append(f"{self.degenerate} with zero or negative (< 0.1 px) width/height{eg('degenerate')}")
        if self.outside:
            parts.append(f"{self.outside} with a box entirely outside its image{eg('outside')}")
        text = f"dropped {self.dropped} annotations: " + "; ".join(parts) if parts else ""
        if self.clipped:
            text += ("; " if text else "") + f"clipped {self.clipped} boxes reaching outside their image"
            text += eg("clipped")
        if self.no_area:
            text += ("; " if text else "") + (
                f"{self.no_area} annotations have no 'area'{eg('no_area')}: evaluation uses the box's "
                "width x height (the bbox-only convention)"
            )
        return text


@dataclass
class CocoAnnotations:
    """A validated (and, where needed, sanitised) COCO detection annotation file.

    Attributes:
        path: the original annotation file.
        categories: the category map (JSON order).
        image_ids: all image ids, sorted.
        file_names: image id -> file name (relative to the image folder).
        sizes: image id -> (height, width) from the annotation.
        annotated: image ids with at least one usable annotation (crowd included).
        annotated_non_crowd: image ids with at least one usable non-crowd annotation.
        num_annotations: usable annotations after sanitising.
        report: what sanitising dropped/clipped.
        clean_doc: the sanitised JSON document when ``report.changed`` (else None; the original is fine as
        is).
        kept: the usable annotations as columns, in file order: ``image_id`` [M] int64, ``category_id`` [M]
        int64, ``bbox`` [M, 4] float64 xywh pixels (clipped where needed), ``iscrowd`` [M] bool.
        raw_sizes: image id -> (width, height) as the file gives them (what DALI divides the boxes by).
    """

    path: Path
    categories: CategoryMap
    image_ids: list[int]
    file_names: dict[int, str]
    sizes: dict[int, tuple[int, int]]
    annotated: set[int]
    annotated_non_crowd: set[int]
    num_annotations: int
    report: SanitiseReport
    clean_doc: dict | None = None
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    raw_sizes: dict[int, tuple[float, float]] = field(default_factory=dict)

    def usable_image_ids(self, include_empty: bool, include_crowd: bool = True) -> list[int]:
        """Sorted ids of images a reader yields: all, or only those with (non-crowd) annotations."""
        if include_empty:
            return list(self.image_ids)
        keep = self.annotated if include_crowd else self.annotated_non_crowd
        return [i for i in self.image_ids if i in keep]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _read_categories(path: Path, categories: list) -> CategoryMap:
    """The category map of a ``categories`` list (integer ids, each once)."""
    if not categories:
        raise DataError(f"{path}: 'categories' is empty; a detection dataset needs at least one category")
    seen: set[int] = set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise DataError(
                f"{path}: categories[{i}] has no integer 'id'; every category needs an integer id"
            )
        if c["id"] in seen:
            raise DataError(f"{path}: category id {c['id']} is listed twice in 'categories'; make ids unique")
        seen.add(c["id"])
    return CategoryMap.from_categories(categories)


def _read_images(path: Path, images: list) -> tuple[dict[int, str], dict[int, tuple[float, float]]]:
    """``{image id: file name}`` and ``{image id: (width, height)}`` (as given) of ``images``."""
    file_names: dict[int, str] = {}
    raw_sizes: dict[int, tuple[float, float]] = {}  # (width, height) as DALI divides by them
    seen_files: dict[str, int] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict):
            raise DataError(f"{path}: images[{i}] is not an object; fix the file")
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                raise DataError(
                    f"{path}: images[{i}] (id {im.get('id')}) has no '{key}'; "
                    "every image needs id, file_name, width and height"
                )
        iid, name, w, h = im["id"], im["file_name"], im["width"], im["height"]
        if not _is_int(iid):
            raise DataError(f"{path}: images[{i}] has a non-integer id {iid!r}; COCO image ids are integers")
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: image {iid} has an empty or non-string file_name; fix the file")
        if not (
            _is_number(w) and _is_number(h) and w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)
        ):
            raise DataError(
                f"{path}: image {iid} ({name}) has width={w!r}, height={h!r}; sizes must be positive numbers"
            )
        if iid in file_names:
            raise DataError(f"{path}: image id {iid} is listed twice in 'images'; make image ids unique")
        if name in seen_files:
            raise DataError(
                f"{path}: file {name} is listed twice in 'images' (ids {seen_files[name]} and {iid}); "
                "list each image once"
            )
        seen_files[name] = iid
        file_names[iid] = name
        raw_sizes[iid] = (w, h)
    return file_names, raw_sizes


def _annotation_fields(path: Path, i: int, a: object) -> tuple[object, object, list]:
    """``(image_id, category_id, bbox)`` of annotation ``i``; a DataError when one is missing or malformed."""
    try:
        iid, cid, box = a["image_id"], a["category_id"], a["bbox"]
    except (KeyError, TypeError):
        if not isinstance(a, dict):
            raise DataError(f"{path}: annotations[{i}] is not an object; fix the file") from None
        key = next(k for k in ("image_id", "category_id", "bbox") if k not in a)
        raise DataError(
            f"{path}: annotation {a.get('id', f'#{i}')} has no '{key}'; COCO detection annotations need "
            "image_id, category_id and bbox"
        ) from None
    if type(box) is not list or len(box) != 4 or not all(type(v) in (int, float) for v in box):  # not bool
        raise DataError(
            f"{path}: annotation {a.get('id', f'#{i}')} has bbox {box!r}; a COCO bbox is "
            "[x, y, width, height] in pixels"
        )
    return iid, cid, box


def _sanitised_box(box: list, width: float, height: float, report: SanitiseReport, name: str) -> list | None:
    """``box`` as the reader may read it (clipped to its image), or None when it must be dropped; what was
    dropped or clipped is noted in ``report`` under ``name``."""
    x, y, bw, bh = box
    if not all(math.isfinite(v) for v in box):
        report.note("non_finite", name)
        return None
    if bw < MIN_BOX_SIZE or bh < MIN_BOX_SIZE:
        report.note("degenerate", f"{name} {box}")
        return None
    clipped = _clip_box(x, y, bw, bh, width, height)
    if clipped is None:
        report.note("outside", f"{name} {box} in {width}x{height}")
        return None
    if clipped is _UNCHANGED:
        return box
    # Float noise a DALI assertion would trip on is repaired silently; real overshoot is reported.
    if max(abs(u - v) for u, v in zip(clipped, box, strict=True)) > 0.5:
        report.note("clipped", f"{name} {box} in {width}x{height}")
    else:
        report.repaired += 1
    return list(clipped)


def _checked_annotation(
    path: Path,
    i: int,
    a: object,
    known_categories: set[int],
    file_names: dict[int, str],
    raw_sizes: dict[int, tuple[float, float]],
    report: SanitiseReport,
) -> tuple[int, int, list, bool] | None:
    """Annotation ``i`` checked one by one: ``(image id, category id, box as the reader may read it,
    crowd)``, or None when it is dropped (noted in ``report``); a DataError when it is malformed."""
    iid, cid, box = _annotation_fields(path, i, a)
    name = f"annotation {a.get('id', f'#{i}')}"
    if cid not in known_categories:
        report.note("unknown_category", f"{name} category {cid}")
        return None
    if iid not in file_names:
        report.note("unknown_image", f"{name} image {iid}")
        return None
    fixed = _sanitised_box(box, *raw_sizes[iid], report, name)
    if fixed is None:
        return None
    return iid, cid, fixed, bool(a.get("iscrowd", 0))


def read_annotations(path: str | os.PathLike) -> CocoAnnotations:
    """Read, validate and sanitise a COCO detection annotation file.

    Raises :class:`DataError` (one line naming the file and the entry) when the file cannot be used: missing,
    not JSON, missing keys, a category/image entry without its required fields, duplicate ids or file names,
    image sizes that are not positive, an annotation without a 4-number ``bbox``. Annotations that can be
    dropped or repaired are handled in ``clean_doc`` and counted in ``report`` (no warning is issued here).
    """
    with collector_paused():
        return _read_annotations(Path(path))


def _read_annotations(path: Path) -> CocoAnnotations:
    doc = load_coco_document(path)
    category_map = _read_categories(path, doc["categories"])
    known_categories = set(category_map.dataset_ids)
    file_names, raw_sizes = _read_images(path, doc["images"])

    report = SanitiseReport()
    anns = doc["annotations"]
    image_ids = np.array(sorted(file_names), dtype=np.int64)
    columns = annotation_columns(anns)
    if columns is None:  # a malformed entry: the per-annotation checks find and name it
        plain = np.zeros(len(anns), dtype=bool)
    else:
        sizes = np.array([raw_sizes[i] for i in image_ids.tolist()], dtype=np.float64).reshape(-1, 2)
        plain = plain_mask(columns, np.array(category_map.dataset_ids), image_ids, sizes, MIN_BOX_SIZE)
    repaired: dict[int, tuple[int, int, list, bool]] = {}  # not plain but kept: (image, category, box, crowd)
    for i in np.flatnonzero(~plain).tolist():
        row = _checked_annotation(path, i, anns[i], known_categories, file_names, raw_sizes, report)
        if row is not None:
            repaired[i] = row
    keep = plain.copy()
    keep[list(repaired)] = True
    if columns is None:
        rows = [repaired[i] for i in sorted(repaired)]
        columns = {
            "image_id": np.array([r[0] for r in rows], dtype=np.int64),
            "category_id": np.array([r[1] for r in rows], dtype=np.int64),
            "bbox": np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4),
            "iscrowd": np.array([r[3] for r in rows], dtype=bool),
        }
    else:
        for i, row in repaired.items():
            columns["bbox"][i] = row[2]
        columns = {k: v[keep] for k, v in columns.items()}
    kept_index = np.flatnonzero(keep).tolist()
    for i in kept_index:
        if "area" not in anns[i]:
            report.note("no_area", f"annotation {anns[i].get('id', f'#{i}')}")
    clean_doc = None
    if report.changed or report.repaired:
        clean_doc = {k: v for k, v in doc.items() if k != "annotations"}
        clean_doc["annotations"] = [
            {**anns[i], "bbox": repaired[i][2]}
            if i in repaired and repaired[i][2] is not anns[i]["bbox"]
            else anns[i]
            for i in kept_index
        ]
    annotated = set(columns["image_id"].tolist())
    return CocoAnnotations(
        path=path,
        categories=category_map,
        image_ids=sorted(file_names),
        file_names=file_names,
        sizes={iid: (int(round(h)), int(round(w))) for iid, (w, h) in raw_sizes.items()},
        annotated=annotated,
        annotated_non_crowd=set(columns["image_id"][~columns["iscrowd"]].tolist()),
        num_annotations=len(kept_index),
        report=report,
        clean_doc=clean_doc,
        kept=columns,
        raw_sizes=raw_sizes,
    )


def _dali_rel(lo: float, extent: float, size: float) -> tuple[float, float]:
    """(left, right) as DALI's COCO reader computes them in float32 with ratio=True and ltrb=True."""
    lo32, ext32, size32 = np.float32(lo), np.float32(extent), np.float32(size)
    return float(lo32 / size32), float((lo32 + ext32) / size32)


_UNCHANGED = ("unchanged",)


def _clip_box(x: float, y: float, w: float, h: float, width: float, height: float):
    """Clip an xywh pixel box to the image so that DALI's float32 relative ltrb lies in [0, 1].

    Returns the clipped (x, y, w, h), ``_UNCHANGED`` when the box is fine as it is, or None when less than
    :data:`MIN_BOX_SIZE` pixels of it are left inside the image.
    """
    if x >= 0 and y >= 0 and x + w <= width * (1 - 1e-6) and y + h <= height * (1 - 1e-6):
        # Clearly inside (float32 rounding is < 1e-6 relative): the common case, no float32 emulation needed.
        return _UNCHANGED if w >= MIN_BOX_SIZE and h >= MIN_BOX_SIZE else None
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < MIN_BOX_SIZE or y1 - y0 < MIN_BOX_SIZE:
        return None
    out = []
    for lo, hi, size in ((x0, x1, width), (y0, y1, height)):
        ext = hi - lo
        # DALI adds in float32: shrink the extent by ulps until the right edge is <= 1 exactly.
        for _ in range(64):
            if _dali_rel(lo, ext, size)[1] <= 1.0:
                break
            ext = float(np.nextafter(np.float32(ext), np.float32(0)))
        out.append((lo, ext))
    (cx, cw), (cy, ch) = out
    if (cx, cy, cw, ch) == (x, y, w, h):
        return _UNCHANGED
    return (cx, cy, cw, ch)


def write_reader_annotations(ann: CocoAnnotations, cache_dir: str | os.PathLike) -> Path:
    """The annotation file DALI's reader should read: the original, or a sanitised copy in ``cache_dir``.

    The copy's name carries a hash of the original path, size and modification time, so it is written once and
    reused; it is written atomically (safe when several ranks share ``cache_dir``).
    """
    if ann.clean_doc is None:
        return ann.path
    st = ann.path.stat()
    key = f"{ann.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_SANITISE_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{ann.path.stem}.sanitised-{digest}.json"
    if not out.is_file():
        write_json_atomic(out, ann.clean_doc, compact=True)
    return out


def warn_sanitised(path: Path, report: dict, reader_file: Path) -> None:
    """Report a repaired annotation file once: one :class:`DataWarning` and the same line through logging
    (so that it lands in the run's log, also under ``-W ignore``). ``report``: ``{"summary", "changed",
    "no_area"}`` (the index's copy of :class:`SanitiseReport`); nothing is said when nothing was counted."""
    if report["changed"]:
        message = (
            f"{path}: {report['summary']}; the pipeline reads a corrected copy ({reader_file}). "
            "Fix the annotation file to silence this warning."
        )
    elif report["no_area"]:
        message = f"{path}: {report['summary']}"
    else:
        return
    log.warning("data: %s", message)
    warnings.warn(message, DataWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# Image files
