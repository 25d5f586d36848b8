"""The annotation index of a split: the cold work done once per node, kept as arrays, read by every rank.

The cold work (parse, validate and repair the annotation file with :func:`read_annotations`, write the
repaired copy when one is needed) runs in the first process that needs it; the others wait on a file lock
(``fcntl.flock``) in the cache folder and then load what it left there. That folder holds, per annotation
file, one ``index-<key>.npz`` of flat arrays (no Python dicts of dicts, no pickle), where ``<key>`` hashes the
file's resolved path, size and modification time and :data:`INDEX_FORMAT`: a changed file misses the cache,
and the stale entry is removed. The image check leaves a stamp keyed by the same and by every setting that
changes what it checks (:func:`ensure_images_checked`).

Per-rank host memory is that of the arrays: about 50 bytes per annotation and 30 per image plus the file
names, instead of the parsed JSON document.

Box format everywhere here: ``[x, y, w, h]`` in pixels of the original image (as in the annotation file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssd_lightning.categories import CategoryMap
from ssd_lightning.data.annotations import read_annotations, write_reader_annotations
from ssd_lightning.data.image_check import check_image_files
from ssd_lightning.errors import DataError
from ssd_lightning.fileio import atomic_path, atomic_write

__all__ = [
    "INDEX_FORMAT",
    "AnnotationIndex",
    "check_shared_categories",
    "default_cache_dir",
    "ensure_images_checked",
    "load_index",
]

log = logging.getLogger(__name__)

# Bump when what an index holds, or how it is computed, changes: older entries then miss.
INDEX_FORMAT = "1"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ssd_lightning/data`` (``~/.cache/ssd_lightning/data``): outside ``data.root``, so a
    read-only data set works, and the same for every rank and every launch on a machine."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ssd_lightning" / "data"


class _ByImageId(Mapping):
    """A read-only ``{image id: value}`` view over arrays indexed by the position in sorted image ids."""

    def __init__(self, image_ids: np.ndarray, value_at) -> None:
        self._ids = image_ids
        self._value_at = value_at

    def _position(self, image_id: int) -> int:
        pos = int(np.searchsorted(self._ids, image_id))
        if pos >= len(self._ids) or int(self._ids[pos]) != int(image_id):
            raise KeyError(image_id)
        return pos

    def __getitem__(self, image_id: int):
        return self._value_at(self._position(image_id))

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self._ids)

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class AnnotationIndex:
    """A split's annotation file as arrays (what the data module and the DALI readers need of it).

    Images (N, sorted by id): ``image_ids`` [N] int64, ``raw_sizes`` [N, 2] float64 (width, height as
    annotated), ``name_blob`` (UTF-8 file names, concatenated) with ``name_ends`` [N] int64.
    Usable annotations (M, file order, after repair): ``ann_image`` [M] int64 (position of the image),
    ``ann_label`` [M] int32 (1..K, the category's place in the file: DALI's remapping), ``ann_box`` [M, 4]
    float64 xywh pixels, ``ann_crowd`` [M] bool. ``report``: ``{"summary", "changed", "no_area"}`` of the
    repair; ``reader_file``: the annotation file DALI's JSON parser reads (the original or the repaired copy).
    """

    path: Path
    reader_file: Path
    categories: CategoryMap
    image_ids: np.ndarray
    raw_sizes: np.ndarray
    name_blob: np.ndarray
    name_ends: np.ndarray
    ann_image: np.ndarray
    ann_label: np.ndarray
    ann_box: np.ndarray
    ann_crowd: np.ndarray
    report: dict

    def __post_init__(self) -> None:
        self._groups: dict[bool, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------------------------------- views

    def file_name_lines(self, positions: np.ndarray) -> bytes:
        """The UTF-8 file names at ``positions``, one per line (gathered with numpy, no str per name)."""
        ends = self.name_ends[positions]
        lengths = ends - np.where(positions > 0, self.name_ends[positions - 1], 0)
        source = np.repeat(ends - lengths, lengths + 1) + group_ranks(lengths + 1)
        out = self.name_blob[np.minimum(source, len(self.name_blob) - 1)]
        out[np.cumsum(lengths + 1) - 1] = ord("\n")
        return out.tobytes()

    def annotations_by_image(self, include_crowd: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(order, first, count)``: annotation indices grouped by image (file order within an image), and
        per image position where its group starts in ``order`` and how long it is (computed once)."""
        if include_crowd not in self._groups:
            ann = np.flatnonzero(np.ones(len(self.ann_image), bool) if include_crowd else ~self.ann_crowd)
            ann = ann[np.argsort(self.ann_image[ann], kind="stable")]
            first = np.searchsorted(self.ann_image[ann], np.arange(len(self.image_ids)))
            self._groups[include_crowd] = (ann, first, np.diff(np.append(first, len(ann))))
        return self._groups[include_crowd]

    def file_name(self, position: int) -> str:
        start = int(self.name_ends[position - 1]) if position > 0 else 0
        return self.name_blob[start : int(self.name_ends[position])].tobytes().decode("utf-8")

    def file_names_at(self, positions: np.ndarray) -> list[str]:
        return [self.file_name(int(p)) for p in positions]

    def names_and_sizes(self, image_ids: list[int]) -> tuple[list[str], list[tuple[int, int]]]:
        """File names and ``(height, width)`` (rounded to whole pixels, as :attr:`sizes`) of ``image_ids``
        (all in the index), in bulk: the image check's look-ups of 118k files in 0.2 s instead of 2 s."""
        positions = np.searchsorted(self.image_ids, np.asarray(image_ids, dtype=np.int64))
        names = self.file_name_lines(positions).decode("utf-8").split("\n")[:-1]
        height_width = np.rint(self.raw_sizes[positions][:, ::-1]).astype(np.int64)
        return names, list(map(tuple, height_width.tolist()))

    @property
    def file_names(self) -> Mapping[int, str]:
        """``{image id: file name}`` (a view; no dict is built)."""
        return _ByImageId(self.image_ids, self.file_name)

    @property
    def sizes(self) -> Mapping[int, tuple[int, int]]:
        """``{image id: (height, width)}`` rounded to whole pixels (a view)."""
        return _ByImageId(
            self.image_ids,
            lambda p: (int(round(self.raw_sizes[p, 1])), int(round(self.raw_sizes[p, 0]))),
        )

    @property
    def num_annotations(self) -> int:
        return len(self.ann_image)

    def annotated(self, include_crowd: bool = True) -> np.ndarray:
        """[N] bool: the images with at least one usable (non-crowd unless ``include_crowd``) annotation."""
        flags = np.zeros(len(self.image_ids), dtype=bool)
        flags[self.ann_image if include_crowd else self.ann_image[~self.ann_crowd]] = True
        return flags

    def usable_positions(self, include_empty: bool, include_crowd: bool = True) -> np.ndarray:
        """Positions (ascending, so by image id) of the images a reader yields: all, or the annotated."""
        if include_empty:
            return np.arange(len(self.image_ids))
        return np.flatnonzero(self.annotated(include_crowd))

    def usable_image_ids(self, include_empty: bool, include_crowd: bool = True) -> list[int]:
        return self.image_ids[self.usable_positions(include_empty, include_crowd)].tolist()

    # ------------------------------------------------------------------------------------------- build

    @classmethod
    def build(cls, path: Path, cache: Path) -> AnnotationIndex:
        """The cold work: parse, validate and repair ``path`` (writing the repaired copy into ``cache``)."""
        ann = read_annotations(path)
        ids = np.asarray(ann.image_ids, dtype=np.int64)
        names = [ann.file_names[i].encode("utf-8") for i in ann.image_ids]
        kept = ann.kept
        category_ids = np.array(ann.categories.dataset_ids, dtype=np.int64)
        by_id = np.argsort(category_ids)  # label of id c: 1 + its place in the file's category list
        return cls(
            path=path,
            reader_file=write_reader_annotations(ann, cache),
            categories=ann.categories,
            image_ids=ids,
            raw_sizes=np.array([ann.raw_sizes[i] for i in ann.image_ids], dtype=np.float64).reshape(-1, 2),
            name_blob=np.frombuffer(b"".join(names), dtype=np.uint8),
            name_ends=np.cumsum([len(n) for n in names], dtype=np.int64),
            ann_image=np.searchsorted(ids, kept["image_id"]).astype(np.int64),
            ann_label=(by_id[np.searchsorted(category_ids[by_id], kept["category_id"])] + 1).astype(np.int32),
            ann_box=kept["bbox"],
            ann_crowd=kept["iscrowd"],
            report={
                "summary": ann.report.summary(),
                "changed": ann.report.changed,
                "no_area": ann.report.no_area,
            },
        )

    # ------------------------------------------------------------------------------------------- files

    _ARRAYS = (
        "image_ids",
        "raw_sizes",
        "name_blob",
        "name_ends",
        "ann_image",
        "ann_label",
        "ann_box",
        "ann_crowd",
    )

    def save(self, out: Path) -> None:
        meta = {
            "path": str(self.path),
            "reader_file": str(self.reader_file),
            "category_ids": self.categories.dataset_ids,
            "category_names": self.categories.names,
            "report": self.report,
        }
        with atomic_write(out) as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **{k: getattr(self, k) for k in self._ARRAYS})

    @classmethod
    def load(cls, file: Path) -> AnnotationIndex:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in cls._ARRAYS}
        return cls(
            path=Path(meta["path"]),
            reader_file=Path(meta["reader_file"]),
            categories=CategoryMap(meta["category_ids"], meta["category_names"]),
            report=meta["report"],
            **arrays,
        )


def group_ranks(lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(n) for n in lengths])`` without a Python loop."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def check_shared_categories(train: AnnotationIndex, val: AnnotationIndex) -> None:
    """Every val category must be a train category of the same id and name (one DataError line if not)."""
    known = dict(zip(train.categories.dataset_ids, train.categories.names, strict=True))
    for cid, name in zip(val.categories.dataset_ids, val.categories.names, strict=True):
        if known.get(cid) != name:
            raise DataError(
                f"category {cid} ({name!r}) of {val.path} is not in {train.path} under that id and name; "
                "train and val must share their categories"
            )


# ----------------------------------------------------------------------------------------------------
# The cache folder


def _digest(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def file_identity(path: Path) -> str:
    """What a cached result of ``path`` is keyed by: resolved path, size, modification time."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def entry_dir(cache: Path, path: Path) -> Path:
    """The cache folder of one annotation file (one per resolved path)."""
    return cache / f"{path.stem}-{_digest(path.resolve())[:10]}"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` exclusively (other processes of the node wait here)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some network mounts): every rank does the work
            log.warning("data: cannot lock %s (%s); each process indexes on its own", folder, e.strerror or e)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def writable_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` (default :func:`default_cache_dir`), created; a private temporary folder (with a
    warning) when it cannot be written: every launch then does the cold work again."""
    cache = Path(os.path.expanduser(str(cache_dir))) if cache_dir not in (None, "") else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
        return cache
    except OSError as e:
        fallback = Path(tempfile.mkdtemp(prefix="ssd_lightning_data_"))
        log.warning(
            "data: cannot write the cache folder %s (%s); using %s for this run (set data.cache_dir=DIR to a "
            "writable folder to keep the annotation index between launches)",
            cache,
            e.strerror or e,
            fallback,
        )
        return fallback


def load_index(path: Path, cache: Path, split: str) -> AnnotationIndex:
    """The index of annotation file ``path``: from ``cache`` when this file (same path, size, mtime) was
    indexed before, else built here (one process of the node at a time; the others wait, then load it)."""
    folder = entry_dir(cache, path)
    try:
        key = _digest(file_identity(path), INDEX_FORMAT)
    except FileNotFoundError:
        raise DataError(f"annotation file {path} not found; fix the data.{split}_annotations path") from None
    file = folder / f"index-{key}.npz"
    start = time.perf_counter()
    with _locked(folder):
        if file.is_file():
            index = AnnotationIndex.load(file)
            log.info(
                "data: %s annotations %s from the cache %s (%s images, %s annotations) in %.1f s",
                split,
                path,
                file,
                f"{len(index.image_ids):,}",
                f"{index.num_annotations:,}",
                time.perf_counter() - start,
            )
            return index
        log.info("data: indexing %s annotations %s (%s MB; once per file)", split, path, _mb(path))
        index = AnnotationIndex.build(path, folder)
        index.save(file)
        stale = [*folder.glob("index-*.npz"), *folder.glob("checked-*"), *folder.glob("*.sanitised-*.json")]
        for old in stale:
            if old not in (file, index.reader_file):  # results of an older version of the file
                old.unlink(missing_ok=True)
    log.info(
        "data: %s annotations %s: %s images, %s annotations (%s) indexed in %.1f s; cached in %s",
        split,
        path,
        f"{len(index.image_ids):,}",
        f"{index.num_annotations:,}",
        "repaired: see the data warning" if index.report["changed"] else "nothing to repair",
        time.perf_counter() - start,
        file,
    )
    return index


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:,.0f}"


def ensure_images_checked(
    index: AnnotationIndex,
    images_dir: Path,
    positions: np.ndarray,
    check_content: bool,
    cache: Path,
    split: str,
) -> None:
    """Check the image files of ``positions`` (:func:`check_image_files`) unless a stamp says that this
    index, folder and selection were checked before with these settings; leave the stamp when they pass.

    The stamp's key covers the annotation file's identity, the image folder (path and modification time:
    files added, removed or renamed change it) and the checked selection and mode. A file replaced in place by
    a broken one is not seen until the key changes; the pipeline then names it when it fails to decode it.
    """
    folder = entry_dir(cache, index.path)
    ids = index.image_ids[positions]
    key = _digest(
        file_identity(index.path),
        INDEX_FORMAT,
        images_dir.resolve(),
        images_dir.stat().st_mtime_ns,
        check_content,
        hashlib.sha1(ids.tobytes()).hexdigest(),
    )
    stamp = folder / f"checked-{key}"
    with _locked(folder):
        if stamp.is_file():
            log.info("data: %s images already checked (%s files; stamp %s)", split, f"{len(ids):,}", stamp)
            return
        start = time.perf_counter()
        check_image_files(images_dir, index, ids.tolist(), check_content=check_content, progress=split)
        with atomic_path(stamp) as tmp:
            tmp.write_text(f"{len(ids)} images of {images_dir} checked (content: {check_content})\n")
    log.info(
        "data: %s images: %s files %s in %.1f s",
        split,
        f"{len(ids):,}",
        "checked (header, trailer, size)" if check_content else "found",
        time.perf_counter() - start,
    )
