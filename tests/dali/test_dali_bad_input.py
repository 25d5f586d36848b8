"""Every bad-input case through COCODataModule: one clear line naming the file and the fix, or a warning and a
skip that loses nothing needed; never a DALI C++ stack trace, a hang or a silent wrong result."""

from __future__ import annotations

import warnings

import pytest
import torch
from dali_helpers import ann_file, copy_set, image_dir, load_json, save_json
from PIL import Image

from ssd_lightning.data import COCODataModule, DataError, DataWarning
from ssd_lightning.evaluation import evaluate_detections


def _dm(root, **kw):
    args = dict(batch_size=2, val_batch_size=2, num_threads=1, device="cpu")
    args.update(kw)
    return COCODataModule(root, **args)


@pytest.fixture()
def root(synthetic_coco, tmp_path):
    return copy_set(synthetic_coco, tmp_path / "set")


def _setup_error(dm, stage="fit") -> str:
    with pytest.raises(DataError) as e:
        dm.setup(stage)
    msg = str(e.value)
    assert "\n" not in msg and "C++" not in msg
    return msg


def _first_image(root, split="train", annotated=True):
    doc = load_json(ann_file(root, split))
    with_ann = {a["image_id"] for a in doc["annotations"]}
    im = next(im for im in doc["images"] if (im["id"] in with_ann) == annotated)
    return image_dir(root, split) / im["file_name"], im


# ------------------------------------------------------------ paths & files


def test_root_missing(tmp_path):
    assert "does not exist; set data.root=DIR" in _setup_error(_dm(tmp_path / "nowhere"))


def test_root_empty(tmp_path):
    assert "is empty" in _setup_error(_dm(tmp_path))


def test_root_not_set():
    assert "data.root is not set" in _setup_error(_dm(None))


def test_annotation_file_missing(root):
    ann_file(root, "val").unlink()
    msg = _setup_error(_dm(root))
    assert "instances_val2017.json not found; set data.val_annotations=FILE" in msg


def test_annotation_json_malformed(root):
    text = ann_file(root).read_text()
    ann_file(root).write_text(text[: len(text) // 2])
    msg = _setup_error(_dm(root))
    assert str(ann_file(root)) in msg and "is not valid JSON" in msg


def test_annotation_not_coco(root):
    doc = load_json(ann_file(root))
    del doc["categories"]
    save_json(ann_file(root), doc)
    msg = _setup_error(_dm(root))
    assert str(ann_file(root)) in msg and "no 'categories' key" in msg
    with pytest.raises(DataError):  # also when the model asks for the class count first
        _ = _dm(root).num_classes


def test_image_file_missing(root):
    path, _ = _first_image(root)
    path.unlink()
    msg = _setup_error(_dm(root))
    assert f"1 of 15 images listed in {ann_file(root)} are missing: {path}: file not found" in msg


def test_truncated_jpeg_is_named_up_front(root):
    path, _ = _first_image(root, "val")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _setup_error(_dm(root), "validate")
    assert f"{path}: truncated JPEG" in msg


def _break_huffman_table(path):
    """Corrupt a JPEG so that its structure looks fine (passes the header scan) but DALI cannot decode it."""
    data = bytearray(path.read_bytes())
    pos = data.index(b"\xff\xc4")
    data[pos + 5 : pos + 21] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("split", ["train", "val"])
def test_corrupt_jpeg_found_at_decode_time_is_named(root, split):
    path, _ = _first_image(root, split)
    _break_huffman_table(path)
    dm = _dm(root)
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    with pytest.raises(DataError) as e:
        for _ in range(2):
            for _batch in loader:
                pass
    msg = str(e.value)
    assert msg.startswith(f"cannot decode {path}") and "replace the file or remove it" in msg
    assert "\n" not in msg


def test_truncated_jpeg_without_the_scan_is_named_at_decode_time(root):
    path, _ = _first_image(root, "val")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dm = _dm(root, check_images=False)
    dm.setup("validate")
    with pytest.raises(DataError, match=f"cannot decode {path}"):
        list(dm.val_dataloader())


def test_grayscale_cmyk_and_png_images_are_fine(root):
    doc = load_json(ann_file(root))
    for k, mode in enumerate(["L", "CMYK"]):
        im = doc["images"][k]
        p = image_dir(root) / im["file_name"]
        Image.open(p).convert(mode).save(p, format="JPEG")
    im = doc["images"][2]
    p = image_dir(root) / im["file_name"]
    Image.open(p).save(p.with_suffix(".png"))
    im["file_name"] = p.with_suffix(".png").name
    p.unlink()
    save_json(ann_file(root), doc)
    dm = _dm(root, batch_size=5)
    dm.setup("fit")
    for _ in range(2):
        for batch in dm.train_dataloader():
            assert batch["images"].shape == (5, 3, 300, 300) and torch.isfinite(batch["images"]).all()


# ------------------------------------------------------------ annotations


def test_bad_boxes_and_unknown_categories_warn_once_and_are_skipped(root):
    doc = load_json(ann_file(root))
    anns = doc["annotations"]
    target = anns[0]["image_id"]
    only = [a for a in anns if a["image_id"] == target]
    for a in only:  # this image keeps no usable annotation -> it is skipped like an empty image
        a["category_id"] = 999
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    others = [a for a in anns if a["image_id"] != target]
    others[0]["bbox"][2] = 0  # zero width
    others[1]["bbox"][3] = -4  # negative height
    w, h = sizes[others[2]["image_id"]]
    others[2]["bbox"] = [w - 10, h - 10, 50, 50]  # reaches outside: clipped
    others[3]["bbox"] = [w + 5, 0, 10, 10]  # entirely outside
    save_json(ann_file(root), doc)
    dm = _dm(root, batch_size=4, train_image_ids=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    ours = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert str(ann_file(root)) in msg and "category 999" in msg
    assert f"dropped {len(only) + 3} annotations" in msg and "clipped 1 boxes" in msg
    dropped = {id(a) for a in only} | {id(others[i]) for i in (0, 1, 3)}
    left = {a["image_id"] for a in anns if id(a) not in dropped}
    assert target not in left and dm.num_train_images == len(left)  # images left without boxes are skipped
    seen = set()
    for _ in range(3):  # the clipped box does not trip DALI's bounds assertion
        for batch in dm.train_dataloader():
            seen.update(batch["image_ids"].tolist())
            assert int(batch["labels"].max()) <= 3
    assert target not in seen
    assert load_json(ann_file(root)) == doc  # the user's file is untouched; DALI reads a sanitised copy


def test_bbox_only_annotations_are_reported_at_start_and_evaluate(root):
    # exporters that write bbox-only COCO files: no area, iscrowd or segmentation
    for split in ("train", "val"):
        doc = load_json(ann_file(root, split))
        for a in doc["annotations"]:
            for key in ("area", "iscrowd", "segmentation"):
                a.pop(key, None)
        save_json(ann_file(root, split), doc)
    dm = _dm(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")  # known at start, in the one data report: not discovered at the first validation
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    count = len(load_json(ann_file(root))["annotations"])
    assert len(messages) == 2 and f"{count} annotations have no 'area'" in messages[0]
    assert "evaluation uses the box's width x height" in messages[0]
    assert load_json(ann_file(root))["annotations"][0].keys() == {"id", "image_id", "category_id", "bbox"}
    # the COCO ground truth of the validation file scores: perfect detections give AP 1
    val = load_json(ann_file(root, "val"))
    rows = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 1.0} for a in val["annotations"]
    ]
    assert evaluate_detections(dm.val_annotations, rows)["AP"] == pytest.approx(1.0)


def test_empty_split_no_images(root):
    doc = load_json(ann_file(root, "val"))
    doc["images"], doc["annotations"] = [], []
    save_json(ann_file(root, "val"), doc)
    msg = _setup_error(_dm(root), "validate")
    assert "lists no images; the val split is empty" in msg


def test_empty_split_no_annotations(root):
    doc = load_json(ann_file(root))
    doc["annotations"] = []
    save_json(ann_file(root), doc)
    msg = _setup_error(_dm(root))
    assert f"none of the 16 images in {ann_file(root)} has a usable annotation" in msg


def test_split_smaller_than_a_batch(root):
    msg = _setup_error(_dm(root, batch_size=8, shard_id=0, num_shards=2))
    assert "fewer than data.batch_size=8 per rank x 2 ranks; lower data.batch_size" in msg


def test_val_categories_must_match_train(root):
    doc = load_json(ann_file(root, "val"))
    doc["categories"][0]["name"] = "something else"
    save_json(ann_file(root, "val"), doc)
    assert "train and val must share their categories" in _setup_error(_dm(root))


def test_image_size_disagreeing_with_the_annotation(root):
    path, im = _first_image(root)
    Image.open(path).transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG")
    msg = _setup_error(_dm(root))
    assert f"{path}: image is {im['height']}x{im['width']} but the annotation says" in msg


def test_gpu_requested_without_cuda(root):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert "data.device=gpu but no CUDA device" in _setup_error(_dm(root, device="gpu"))
