"""Layout resolution, annotation validation/sanitising, image checks, category maps, synthetic set (no
DALI)."""

from __future__ import annotations

import json
import os

import numpy as np
import orjson
import pytest
import torch
from dali_helpers import ann_file, copy_set, image_dir, load_json, save_json
from PIL import Image

from ssd_lightning.categories import CategoryMap
from ssd_lightning.data.annotations import _dali_rel, read_annotations, write_reader_annotations
from ssd_lightning.data.coco_json import load_coco_document
from ssd_lightning.data.image_check import check_image_files, inspect_image
from ssd_lightning.data.layout import resolve_split_paths
from ssd_lightning.data.synthetic import MARKER, ensure_synthetic_coco, write_synthetic_coco
from ssd_lightning.errors import DataError

# ------------------------------------------------------------ categories


def test_category_map_round_trips_non_contiguous_ids():
    cats = CategoryMap([11, 3, 90, 7], ["c", "a", "z", "b"])  # JSON order kept, not sorted
    assert cats.num_classes == 5 and len(cats) == 4
    labels = torch.tensor([[1, 2], [3, 4]])
    ids = cats.to_dataset_id(labels)
    assert ids.tolist() == [[11, 3], [90, 7]] and ids.dtype == torch.int64
    assert torch.equal(cats.to_label(ids), labels)
    assert cats.to_dataset_id(torch.tensor([0])).tolist() == [-1]  # background
    with pytest.raises(ValueError):
        cats.to_dataset_id(torch.tensor([5]))
    with pytest.raises(ValueError, match="unknown dataset category id 4"):
        cats.to_label([4])
    assert cats.as_dict() == {"category_ids": [11, 3, 90, 7], "class_names": ["c", "a", "z", "b"]}
    assert CategoryMap.from_categories([{"id": 5, "name": "x"}]) == CategoryMap([5], ["x"])


# ------------------------------------------------------------ layout


def test_seed_layout_and_plain_coco_layout(synthetic_coco, tmp_path):
    images, ann = resolve_split_paths(synthetic_coco, "train")
    assert images == image_dir(synthetic_coco) and ann == ann_file(synthetic_coco)
    plain = tmp_path / "coco"
    (plain / "annotations").mkdir(parents=True)
    os.symlink(image_dir(synthetic_coco, "val"), plain / "val2017")
    os.symlink(ann_file(synthetic_coco, "val"), plain / "annotations" / "instances_val2017.json")
    assert resolve_split_paths(plain, "val") == (
        plain / "val2017",
        plain / "annotations/instances_val2017.json",
    )


def test_per_split_overrides_relative_to_root(synthetic_coco, tmp_path):
    got = resolve_split_paths(
        synthetic_coco, "val", "images/train2017", "annotations/instances_train2017.json"
    )
    assert got == (image_dir(synthetic_coco), ann_file(synthetic_coco))
    # without root, absolute paths
    got = resolve_split_paths(None, "train", image_dir(synthetic_coco), ann_file(synthetic_coco))
    assert got == (image_dir(synthetic_coco), ann_file(synthetic_coco))


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_root", r"data.root .*nope does not exist; set data.root=DIR"),
        ("empty_root", r"data.root .*empty is empty"),
        (
            "no_annotations",
            r"train annotation file .*instances_train2017.json not found; set data.train_annotations",
        ),
        ("no_images", r"no train image folder in .*; set data.train_images=DIR"),
        ("bad_override", r"val image folder .*elsewhere does not exist; fix data.val_images"),
        ("no_root", r"data.root is not set"),
    ],
)
def test_layout_errors_name_the_path_and_the_fix(tmp_path, case, match):
    root = tmp_path / "empty"
    root.mkdir()
    if case == "missing_root":
        args = (tmp_path / "nope", "train")
    elif case == "empty_root":
        args = (root, "train")
    elif case == "no_annotations":
        (root / "images" / "train2017").mkdir(parents=True)
        args = (root, "train")
    elif case == "no_images":
        (root / "annotations").mkdir()
        args = (root, "train")
    elif case == "bad_override":
        (root / "x").touch()
        args = (root, "val", "elsewhere")
    else:
        args = (None, "train")
    with pytest.raises(DataError, match=match) as e:
        resolve_split_paths(*args)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------ annotations


def _doc(**over):
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "iscrowd": 0}],
        "categories": [{"id": 3, "name": "a"}],
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"images": [', r"is not valid JSON \(Expecting value at line 1 column 13\); re-export"),
        ("[1, 2]", r"is not a COCO detection file \(top level is a list"),
        (json.dumps({"images": [], "categories": []}), r"no 'annotations' key"),
        (json.dumps(_doc(categories=[])), r"'categories' is empty"),
        (
            json.dumps(_doc(images=[{"id": 1, "file_name": "a.jpg", "width": 9}])),
            r"images\[0\] \(id 1\) has no 'height'",
        ),
        (
            json.dumps(_doc(images=[{"id": 1, "file_name": "a.jpg", "width": 0, "height": 5}])),
            r"width=0, height=5",
        ),
        (
            json.dumps(_doc(images=_doc()["images"] * 2)),
            r"image id 1 is listed twice",
        ),
        (
            json.dumps(_doc(annotations=[{"id": 9, "image_id": 1, "category_id": 3}])),
            r"annotation 9 has no 'bbox'",
        ),
        (
            json.dumps(_doc(annotations=[{"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3]}])),
            r"annotation 9 has bbox \[1, 2, 3\]; a COCO bbox is \[x, y, width, height\]",
        ),
        (json.dumps(_doc(categories=[{"id": 3}, {"id": 3}])), r"category id 3 is listed twice"),
    ],
)
def test_malformed_annotation_files_raise_one_line(tmp_path, content, match):
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        read_annotations(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_sanitising_drops_and_clips_bad_annotations(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20]},  # fine
        {"id": 2, "image_id": 1, "category_id": 99, "bbox": [10, 10, 20, 20]},  # unknown category
        {"id": 3, "image_id": 42, "category_id": 3, "bbox": [10, 10, 20, 20]},  # unknown image
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 20]},  # zero width
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, -5]},  # negative height
        {"id": 6, "image_id": 1, "category_id": 3, "bbox": [90, -10, 30, 40]},  # reaches outside: clipped
        {"id": 7, "image_id": 1, "category_id": 3, "bbox": [150, 10, 20, 20]},  # entirely outside
        {"id": 8, "image_id": 1, "category_id": 3, "bbox": [float("nan"), 10, 20, 20]},  # non-finite
        {"id": 9, "image_id": 2, "category_id": 3, "bbox": [33.3, 0, 66.7 + 1e-9, 80]},  # float noise
    ]
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}] + [
        {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}
    ]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_doc(images=images, annotations=anns)))
    ann = read_annotations(path)
    r = ann.report
    assert (
        r.unknown_category,
        r.unknown_image,
        r.degenerate,
        r.outside,
        r.non_finite,
        r.clipped,
        r.repaired,
    ) == (
        1,
        1,
        2,
        1,
        1,
        1,
        1,
    )
    summary = r.summary()
    assert "dropped 6 annotations" in summary and "category 99" in summary and "clipped 1 boxes" in summary
    kept = {a["id"]: a["bbox"] for a in ann.clean_doc["annotations"]}
    assert sorted(kept) == [1, 6, 9]
    assert kept[6] == pytest.approx([90, 0, 10, 30])
    for _aid, (x, y, w, h) in kept.items():  # what DALI computes must be inside [0, 1]
        assert 0 <= _dali_rel(x, w, 100)[0] and _dali_rel(x, w, 100)[1] <= 1.0
        assert 0 <= _dali_rel(y, h, 80)[0] and _dali_rel(y, h, 80)[1] <= 1.0
    assert ann.annotated == {1, 2}
    copy = write_reader_annotations(ann, tmp_path / "cache")
    assert (
        copy.parent == tmp_path / "cache" and load_json(copy)["annotations"] == ann.clean_doc["annotations"]
    )
    assert write_reader_annotations(ann, tmp_path / "cache") == copy  # reused


def test_clean_file_is_read_as_is(synthetic_coco, tmp_path):
    ann = read_annotations(ann_file(synthetic_coco))
    assert ann.clean_doc is None and not ann.report.changed
    assert write_reader_annotations(ann, tmp_path) == ann_file(synthetic_coco)
    assert ann.categories.dataset_ids == [3, 7, 11]
    assert len(ann.image_ids) == 16 and len(ann.annotated) == 15  # one image without annotations


def test_the_fast_parser_reads_what_json_reads_and_hands_it_what_it_refuses(synthetic_coco, tmp_path):
    """orjson parses the files; what it refuses (NaN, a lone surrogate) goes to ``json``, as before."""
    path = ann_file(synthetic_coco)
    assert load_coco_document(path) == json.loads(path.read_text())
    doc = load_json(path)
    doc["info"] = {"description": "\ud800 NaN", "nan": float("nan")}
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(doc))  # the literal NaN and the escaped lone surrogate: not strict JSON
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(odd.read_bytes())
    parsed = load_coco_document(odd)
    assert parsed["info"]["description"] == "\ud800 NaN" and np.isnan(parsed["info"]["nan"])
    assert parsed["annotations"] == doc["annotations"]


def test_crowd_annotations_are_tracked(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(_doc(annotations=anns)))
    ann = read_annotations(path)
    assert ann.annotated == {1} and ann.annotated_non_crowd == set()
    assert ann.usable_image_ids(include_empty=False, include_crowd=False) == []
    assert ann.usable_image_ids(include_empty=False) == [1]


# ------------------------------------------------------------ images


@pytest.fixture()
def sample_images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    d = tmp_path / "img"
    d.mkdir()
    rgb.save(d / "rgb.jpg", quality=90)
    rgb.convert("L").save(d / "grey.jpg")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    rgb.save(d / "rgb.png")
    rgb.convert("RGBA").save(d / "rgba.png")
    rgb.save(d / "anim.gif")
    data = (d / "rgb.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "truncated.png").write_bytes((d / "rgb.png").read_bytes()[:-40])
    (d / "html.jpg").write_bytes(b"<html>404 not found</html>" * 10)
    (d / "empty.jpg").write_bytes(b"")
    (d / "header.jpg").write_bytes(data[:30] + bytes(200) + data[230:])
    (d / "trailing.jpg").write_bytes(data + bytes(6000))  # data after the end marker: DALI decodes it
    return d


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("rgb.jpg", "JPEG"),
        ("grey.jpg", "JPEG"),
        ("cmyk.jpg", "JPEG"),
        ("rgb.png", "PNG"),
        ("rgba.png", "PNG"),
        ("trailing.jpg", "JPEG"),
    ],
)
def test_inspect_image_accepts_what_dali_decodes(sample_images, name, fmt):
    assert inspect_image(sample_images / name) == (fmt, 60, 40)


@pytest.mark.parametrize(
    "name, match",
    [
        ("truncated.jpg", "truncated JPEG"),
        ("truncated.png", "truncated PNG"),
        ("html.jpg", "not an image file"),
        ("empty.jpg", "empty file"),
        ("header.jpg", "corrupt JPEG header"),
        ("anim.gif", "GIF images are not supported"),
        ("missing.jpg", "file not found"),
    ],
)
def test_inspect_image_rejects_broken_files(sample_images, name, match):
    with pytest.raises(ValueError, match=match):
        inspect_image(sample_images / name)


def test_check_image_files_names_missing_and_mismatched_files(synthetic_coco, tmp_path):
    root = copy_set(synthetic_coco, tmp_path / "set")
    ann = read_annotations(ann_file(root))
    check_image_files(image_dir(root), ann, ann.image_ids)  # all fine
    gone = [image_dir(root) / ann.file_names[i] for i in ann.image_ids[:4]]
    for p in gone:
        p.unlink()
    with pytest.raises(
        DataError, match=r"4 of 16 images listed in .* are missing: .*000000000001.jpg: file not found"
    ):
        check_image_files(image_dir(root), ann, ann.image_ids, check_content=False)
    # a file whose size differs from the annotation (boxes would be misplaced)
    doc = load_json(ann_file(root))
    doc["images"][5]["width"] += 10
    save_json(ann_file(root), doc)
    ann = read_annotations(ann_file(root))
    with pytest.raises(DataError, match=r"but the annotation says") as e:
        check_image_files(image_dir(root), ann, ann.image_ids[4:])
    assert ann.file_names[ann.image_ids[5]] in str(e.value)


# ------------------------------------------------------------ synthetic


def test_synthetic_set_is_deterministic_and_coco_shaped(tmp_path):
    a = write_synthetic_coco(tmp_path / "a", 5, 3, seed=3, size_range=(64, 96))
    b = write_synthetic_coco(tmp_path / "b", 5, 3, seed=3, size_range=(64, 96))
    for split in ("train", "val"):
        assert ann_file(a, split).read_text() == ann_file(b, split).read_text()
        for p in image_dir(a, split).iterdir():
            assert p.read_bytes() == (image_dir(b, split) / p.name).read_bytes()
    doc = load_json(ann_file(a))
    assert [c["id"] for c in doc["categories"]] == [3, 7, 11]
    ids = [im["id"] for im in doc["images"]]
    assert ids == sorted(ids) and ids[1] - ids[0] == 2  # non-contiguous
    with_ann = {x["image_id"] for x in doc["annotations"]}
    assert len(with_ann) == 4  # one image without annotations
    for im in doc["images"]:
        assert 64 <= im["width"] <= 96 and 64 <= im["height"] <= 96
        assert Image.open(image_dir(a) / im["file_name"]).size == (im["width"], im["height"])
    for x in doc["annotations"]:
        _, _, w, h = x["bbox"]
        assert w >= 8 and h >= 8


def test_ensure_synthetic_writes_once_and_redoes_an_interrupted_write(tmp_path):
    root = tmp_path / "syn"
    ensure_synthetic_coco(root, 3, 2, seed=1, size_range=(64, 80))
    marker = root / MARKER
    stamp = marker.stat().st_mtime_ns
    ensure_synthetic_coco(root, 3, 2, seed=1, size_range=(64, 80))
    assert marker.stat().st_mtime_ns == stamp  # complete: not rewritten
    marker.unlink()  # as if killed before the end: some images not written yet
    first = image_dir(root, "val") / load_json(ann_file(root, "val"))["images"][0]["file_name"]
    first.unlink()
    ensure_synthetic_coco(root, 3, 2, seed=1, size_range=(64, 80))
    assert marker.is_file() and first.is_file()
    foreign = tmp_path / "real"
    save_json(ann_file(foreign), {"images": [], "annotations": [], "categories": []})
    with pytest.raises(ValueError, match="refusing to overwrite"):
        ensure_synthetic_coco(foreign, 3, 2)
