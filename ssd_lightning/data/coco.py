"""COCO-format datasets: folder layout, annotation validation and sanitising, image checks, category maps.

Everything here runs before any DALI pipeline is built, because DALI (2.4) reports bad data badly: unknown
category ids become label 0 (background) silently, boxes with non-positive size are dropped silently, a box
that reaches outside its image by a float ulp aborts ``random_bbox_crop`` with a C++ assertion, and a missing
or corrupt image aborts the pipeline without naming the file. So:

* structural problems (missing file, malformed JSON, missing keys, duplicate ids, bad image sizes) raise a
  one-line :class:`DataError` naming the file/annotation and the fix;
* bad annotations that can be dropped or repaired without losing anything the user needs (unknown category or
  image ids, zero/negative/non-finite boxes, boxes reaching outside the image) are dropped or clipped in a
  sanitised copy of the annotation file that the DALI reader reads, with one :class:`DataWarning` summarising
  the counts and naming the file;
* every image file is checked up front (exists, recognised format, JPEG/PNG structure intact, size matches the
  annotation) with a cheap header/trailer read, and all problems are reported in one :class:`DataError`.

Box formats: COCO annotation boxes are ``[x, y, w, h]`` in pixels of the original image.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataError",
    "DataWarning",
    "CategoryMap",
    "CocoAnnotations",
    "SanitiseReport",
    "resolve_split_paths",
    "read_annotations",
    "check_image_files",
    "inspect_image",
    "write_reader_annotations",
    "LAYOUT_HINT",
]

LAYOUT_HINT = (
    "expected root/images/{train2017,val2017} + root/annotations/instances_{train,val}2017.json "
    "or root/{train2017,val2017,annotations}"
)
# DALI's readers.coco drops boxes narrower or lower than this many pixels (its `size_threshold`); we drop them
# in the sanitised copy instead so that the image counts we compute equal what the reader yields.
MIN_BOX_SIZE = 0.1
_SANITISE_VERSION = "1"


class DataError(ValueError):
    """A problem with the user's data or data paths. ``str(e)`` is one line naming the file and the fix."""


class DataWarning(UserWarning):
    """Data was repaired or skipped (the message says what, where, and how to silence it)."""


# ----------------------------------------------------------------------------------------------------
# Category map


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

    def as_dict(self) -> dict[str, list]:
        """Plain-types form for checkpoints: ``{"category_ids": [...], "class_names": [...]}``."""
        return {"category_ids": list(self.dataset_ids), "class_names": list(self.names)}


# ----------------------------------------------------------------------------------------------------
# Layout


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


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file {path} not found; fix the data.*_annotations path") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "re-export or re-download it"
        ) from None
    except UnicodeDecodeError:
        raise DataError(
            f"{path} is not a UTF-8 JSON text file; point data.*_annotations at a COCO JSON"
        ) from None
    except OSError as e:
        raise DataError(
            f"cannot read annotation file {path} ({e.strerror}); check the path and permissions"
        ) from None
    if not isinstance(doc, dict):
        raise DataError(
            f"{path} is not a COCO detection file (top level is a {type(doc).__name__}, not an object with "
            "'images', 'annotations' and 'categories')"
        )
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise DataError(
                f"{path} is not a COCO detection file: no '{key}' key (a COCO instances file has 'images', "
                "'annotations' and 'categories'); use an instances_*.json file"
            )
        if not isinstance(doc[key], list):
            raise DataError(f"{path}: '{key}' must be a list, got {type(doc[key]).__name__}; fix the file")
    return doc


def read_annotations(path: str | os.PathLike) -> CocoAnnotations:
    """Read, validate and sanitise a COCO detection annotation file.

    Raises :class:`DataError` (one line naming the file and the entry) when the file cannot be used: missing,
    not JSON, missing keys, a category/image entry without its required fields, duplicate ids or file names,
    image sizes that are not positive, an annotation without a 4-number ``bbox``. Annotations that can be
    dropped or repaired are handled in ``clean_doc`` and counted in ``report`` (no warning is issued here).
    """
    path = Path(path)
    doc = _load_json(path)

    categories = doc["categories"]
    if not categories:
        raise DataError(f"{path}: 'categories' is empty; a detection dataset needs at least one category")
    seen_cat: set[int] = set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise DataError(
                f"{path}: categories[{i}] has no integer 'id'; every category needs an integer id"
            )
        if c["id"] in seen_cat:
            raise DataError(f"{path}: category id {c['id']} is listed twice in 'categories'; make ids unique")
        seen_cat.add(c["id"])
    category_map = CategoryMap.from_categories(categories)

    file_names: dict[int, str] = {}
    sizes: dict[int, tuple[int, int]] = {}
    raw_sizes: dict[int, tuple[float, float]] = {}  # (width, height) as DALI divides by them
    seen_files: dict[str, int] = {}
    for i, im in enumerate(doc["images"]):
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
        sizes[iid] = (int(round(h)), int(round(w)))
        raw_sizes[iid] = (w, h)

    report = SanitiseReport()
    kept: list[dict] = []
    annotated: set[int] = set()
    annotated_non_crowd: set[int] = set()
    number = (int, float)  # exact types: bool is not a number here
    isfinite = math.isfinite
    for i, a in enumerate(doc["annotations"]):
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
        if type(box) is not list or len(box) != 4 or not all(type(v) in number for v in box):
            raise DataError(
                f"{path}: annotation {a.get('id', f'#{i}')} has bbox {box!r}; a COCO bbox is "
                "[x, y, width, height] in pixels"
            )
        if cid not in seen_cat:
            report.note("unknown_category", f"annotation {a.get('id', f'#{i}')} category {cid}")
            continue
        if iid not in file_names:
            report.note("unknown_image", f"annotation {a.get('id', f'#{i}')} image {iid}")
            continue
        x, y, bw, bh = box
        if not (isfinite(x) and isfinite(y) and isfinite(bw) and isfinite(bh)):
            report.note("non_finite", f"annotation {a.get('id', f'#{i}')}")
            continue
        if bw < MIN_BOX_SIZE or bh < MIN_BOX_SIZE:
            report.note("degenerate", f"annotation {a.get('id', f'#{i}')} {box}")
            continue
        width, height = raw_sizes[iid]
        clipped = _clip_box(x, y, bw, bh, width, height)
        if clipped is None:
            report.note("outside", f"annotation {a.get('id', f'#{i}')} {box} in {width}x{height}")
            continue
        if clipped is not _UNCHANGED:
            # Float noise a DALI assertion would trip on is repaired silently; real overshoot is reported.
            if max(abs(u - v) for u, v in zip(clipped, (x, y, bw, bh), strict=True)) > 0.5:
                report.note("clipped", f"annotation {a.get('id', f'#{i}')} {box} in {width}x{height}")
            else:
                report.repaired += 1
            a = {**a, "bbox": list(clipped)}
        kept.append(a)
        annotated.add(iid)
        if not a.get("iscrowd", 0):
            annotated_non_crowd.add(iid)

    clean_doc = None
    if report.changed or report.repaired:
        clean_doc = {k: v for k, v in doc.items() if k != "annotations"}
        clean_doc["annotations"] = kept
    return CocoAnnotations(
        path=path,
        categories=category_map,
        image_ids=sorted(file_names),
        file_names=file_names,
        sizes=sizes,
        annotated=annotated,
        annotated_non_crowd=annotated_non_crowd,
        num_annotations=len(kept),
        report=report,
        clean_doc=clean_doc,
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
        tmp = cache / f".{out.name}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(ann.clean_doc, f, separators=(",", ":"))
        os.replace(tmp, out)
    return out


def warn_sanitised(ann: CocoAnnotations, reader_file: Path) -> None:
    """Issue the single :class:`DataWarning` for a sanitised annotation file (no-op when nothing was
    counted)."""
    if ann.report.changed:
        warnings.warn(
            f"{ann.path}: {ann.report.summary()}; the pipeline reads a corrected copy ({reader_file}). "
            "Fix the annotation file to silence this warning.",
            DataWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------
# Image files

_HEAD = 1 << 16
_TAIL = 4096
# Formats DALI's image decoders read.
_SUPPORTED_PIL = {"BMP", "TIFF", "WEBP", "JPEG2000", "PPM"}


def _jpeg_header(head: bytes, read_more) -> tuple[int, int]:
    """Walk the JPEG markers from SOI to SOS; return (width, height) from the SOF segment, or raise
    ValueError."""
    buf = head
    pos = 2
    size: tuple[int, int] | None = None
    while True:
        if pos + 4 > len(buf):
            more = read_more(len(buf))
            if not more:
                raise ValueError("truncated JPEG header")
            buf += more
            continue
        if buf[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG header (no marker at byte {pos})")
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if marker == 0xD9:
            raise ValueError("JPEG ends before any image data")
        (length,) = struct.unpack(">H", buf[pos + 2 : pos + 4])
        if length < 2:
            raise ValueError(f"corrupt JPEG header (segment length {length} at byte {pos})")
        if marker == 0xDA:  # start of scan
            if size is None:
                raise ValueError("corrupt JPEG header (no frame header before the image data)")
            return size
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            while pos + 9 > len(buf):
                more = read_more(len(buf))
                if not more:
                    raise ValueError("truncated JPEG header")
                buf += more
            height, width = struct.unpack(">HH", buf[pos + 5 : pos + 9])
            if width == 0 or height == 0:
                raise ValueError(f"JPEG frame header gives size {width}x{height}")
            size = (width, height)
        pos += 2 + length


def dali_decode_error(path: str | os.PathLike) -> str | None:
    """Decode one file with DALI's own CPU decoder (dynamic mode); the failure reason, or None if it decodes.

    The exact oracle for "will the pipeline decode this file", used where the cheap checks are not conclusive
    and to name the culprit after a pipeline failed to decode a batch (DALI does not say which file). Not
    thread-safe: call it from one thread.
    """
    from nvidia.dali.experimental import dynamic as ndd

    try:
        data = np.fromfile(path, dtype=np.uint8)
        ndd.decoders.image(ndd.as_tensor(data), device="cpu", adjust_orientation=False).evaluate()
    except Exception as e:  # noqa: BLE001 - any failure of the decoder is the answer
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("C++ context")]
        reason = lines[0] if lines else type(e).__name__
        if "Failed to decode sample" in reason or "nvImageCodec failure" in reason:
            reason = "corrupt image data"  # the codec's own words go to stderr, not into the exception
        return reason
    return None


def _inspect(path: Path) -> tuple[str, int, int, str | None]:
    """:func:`inspect_image` without the decoder check: (format, width, height, suspicion or None)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            if not head:
                raise ValueError("empty file")
            f.seek(0, os.SEEK_END)
            total = f.tell()
            f.seek(max(0, total - _TAIL))
            tail = f.read()

            def read_more(offset: int) -> bytes:
                f.seek(offset)
                return f.read(_HEAD)

            if head[:3] == b"\xff\xd8\xff":
                width, height = _jpeg_header(head, read_more)
                suspect = None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
                return "JPEG", width, height, suspect
            if head[:8] == b"\x89PNG\r\n\x1a\n":
                if head[12:16] != b"IHDR" or len(head) < 24:
                    raise ValueError("corrupt PNG header")
                width, height = struct.unpack(">II", head[16:24])
                suspect = None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
                return "PNG", width, height, suspect
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except IsADirectoryError:
        raise ValueError("is a folder, not an image") from None
    except PermissionError:
        raise ValueError("permission denied") from None
    except OSError as e:
        raise ValueError(f"cannot read ({e.strerror})") from None
    except struct.error:
        raise ValueError("corrupt image header") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt, (width, height) = im.format or "?", im.size
    except UnidentifiedImageError:
        raise ValueError("not an image file (unknown format)") from None
    except Exception as e:  # noqa: BLE001 - any Pillow parse failure means a bad header
        raise ValueError(f"corrupt image header ({e})") from None
    if fmt not in _SUPPORTED_PIL:
        raise ValueError(f"{fmt} images are not supported by the DALI decoder; convert it to JPEG or PNG")
    return fmt, width, height, None


def inspect_image(path: str | os.PathLike) -> tuple[str, int, int]:
    """Cheaply check an image file: returns (format, width, height) or raises ValueError with the reason.

    Reads the header and the last few KB: recognises the format from its magic bytes, walks JPEG markers up
    to the image data (what DALI's parser does first, as strictly), and looks for the JPEG end-of-image / PNG
    IEND trailer, which a truncated download lacks; a file without it (or with data appended after it) is
    decoded once with DALI's decoder to decide. Sizes are in stored pixel orientation (EXIF orientation is not
    applied, as in the pipelines and as COCO annotations are made).
    """
    fmt, width, height, suspect = _inspect(Path(path))
    if suspect is not None and dali_decode_error(path) is not None:
        raise ValueError(suspect)
    return fmt, width, height


def check_image_files(
    image_dir: str | os.PathLike,
    ann: CocoAnnotations,
    image_ids: Iterable[int],
    check_content: bool = True,
    max_workers: int = 8,
) -> None:
    """Check that every listed image exists (and, with ``check_content``, is intact and of the annotated
    size).

    Raises one :class:`DataError` listing the first few bad files with their reasons and the total count.
    """
    image_dir = Path(image_dir)
    ids = list(image_ids)

    def check(iid: int) -> str | None:
        p = image_dir / ann.file_names[iid]
        if not check_content:
            return None if p.is_file() else "file not found"
        try:
            _fmt, width, height, suspect = _inspect(p)
        except ValueError as e:
            return str(e)
        h, w = ann.sizes[iid]
        if (width, height) != (w, h):
            return f"image is {width}x{height} but the annotation says {w}x{h} (boxes would be misplaced)"
        return f"?{suspect}" if suspect else None

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        results = list(pool.map(check, ids, chunksize=64))
    for k, (iid, r) in enumerate(zip(ids, results, strict=True)):
        if r is not None and r.startswith("?"):  # not conclusive: ask the decoder (rare, one thread)
            results[k] = r[1:] if dali_decode_error(image_dir / ann.file_names[iid]) is not None else None
    bad = [(iid, r) for iid, r in zip(ids, results, strict=True) if r is not None]
    if not bad:
        return
    missing = sum(r == "file not found" for _, r in bad)
    first = "; ".join(f"{image_dir / ann.file_names[iid]}: {r}" for iid, r in bad[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    what = "missing" if missing == len(bad) else "missing or unreadable"
    raise DataError(
        f"{len(bad)} of {len(ids)} images listed in {ann.path} are {what}: {first}{more}; "
        "restore or replace them, or remove them from the annotation file"
    )
