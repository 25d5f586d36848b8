"""The real DALI graphs on the CPU: outputs, box encoding, flip/crop geometry, image kinds, category order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dali_helpers import (
    COLOURS,
    GREY,
    ann_file,
    denormalize,
    image_dir,
    load_json,
    run_pipeline,
    save_json,
    write_boxes_set,
)
from PIL import Image

from ssd_lightning.boxes import decode_offsets, encode_offsets, ssd300_default_boxes
from ssd_lightning.categories import CategoryMap
from ssd_lightning.data.pipelines import Augmentation, eval_pipeline, train_pipeline

DBOXES = ssd300_default_boxes()
NO_COLOUR = {"brightness": (1, 1), "contrast": (1, 1), "saturation": (1, 1), "hue": (0, 0)}
NO_CROP = {"crop_thresholds": (0.0,), "crop_scaling": (1.0, 1.0)}


def _train(root, split="train", **kw):
    """The training pipeline; keyword arguments that are Augmentation fields go into its augmentation."""
    fields = set(Augmentation.__dataclass_fields__)
    augmentation = Augmentation(**{k: kw.pop(k) for k in list(kw) if k in fields})
    args = dict(
        images_dir=str(image_dir(root, split)),
        annotation_file=str(ann_file(root, split)),
        anchors_ltrb=DBOXES.ltrb_list(),
        batch_size=4,
        num_threads=1,
        device_id=None,
        seed=1,
        shuffle_seed=0,
        return_image_ids=True,
        augmentation=augmentation,
    )
    args.update(kw)
    return train_pipeline(**args)


def _eval(root, split="val", **kw):
    doc = load_json(ann_file(root, split))
    args = dict(
        images_dir=str(image_dir(root, split)),
        annotation_file=str(ann_file(root, split)),
        file_names=[im["file_name"] for im in sorted(doc["images"], key=lambda im: im["id"])],
        batch_size=4,
        num_threads=1,
        device_id=None,
    )
    args.update(kw)
    return eval_pipeline(**args)


def _gt(root, split="train"):
    """image id -> list of (category id, ltrb relative) from the annotation file."""
    doc = load_json(ann_file(root, split))
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    out = {i: [] for i in sizes}
    for a in doc["annotations"]:
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        out[a["image_id"]].append((a["category_id"], [x / w, y / h, (x + bw) / w, (y + bh) / h]))
    return out


def test_train_outputs_shapes_dtypes_ranges(synthetic_coco):
    (images, boxes, labels, ids), *_ = run_pipeline(_train(synthetic_coco), iterations=2)[-1:]
    assert len(images) == 4
    for img, box, lab, iid in zip(images, boxes, labels, ids, strict=True):
        assert img.shape == (3, 300, 300) and img.dtype == np.float32
        assert -2.2 < img.min() and img.max() < 2.7  # ImageNet-normalised 0..255
        assert box.shape == (8732, 4) and box.dtype == np.float32
        assert lab.shape == (8732,) and lab.dtype == np.int32
        assert set(np.unique(lab)) <= {0, 1, 2, 3} and (lab > 0).any()
        pos = box[lab > 0]
        assert (pos[:, 2:] > 0).all() and (pos[:, :2] >= 0).all() and (pos[:, :2] <= 1).all()
        assert iid.shape == (1,)


def test_fp16_output(synthetic_coco):
    (images, *_), *_ = run_pipeline(_train(synthetic_coco, dtype="float16"))
    assert images[0].dtype == np.float16
    (images, _), *_ = run_pipeline(_eval(synthetic_coco, dtype="float16"))
    assert images[0].dtype == np.float16


def test_box_encoder_targets_decode_back_to_the_ground_truth(synthetic_coco):
    gt = _gt(synthetic_coco)
    cats = CategoryMap.from_categories(load_json(ann_file(synthetic_coco))["categories"])
    anchors = DBOXES.xywh
    checked = 0
    for _images, boxes, labels, ids in run_pipeline(
        _train(synthetic_coco, flip_probability=0.0, **NO_CROP), 2
    ):
        for box, lab, iid in zip(boxes, labels, ids, strict=True):
            box, lab = torch.from_numpy(box), torch.from_numpy(lab).long()
            truth = gt[int(iid[0])]
            pos = lab > 0
            # the loss's offsets, decoded as the model output would be, give back the GT boxes exactly
            offsets = encode_offsets(box.T[None], anchors.T)
            decoded = decode_offsets(offsets, anchors)[0]
            truth_boxes = torch.tensor([b for _, b in truth])
            truth_ids = torch.tensor([c for c, _ in truth])
            err = (decoded[pos][:, None, :] - truth_boxes[None]).abs().amax(-1)  # [P, G]
            best = err.argmin(1)
            assert (err.min(1).values < 1e-4).all()
            assert torch.equal(cats.to_dataset_id(lab[pos]), truth_ids[best])  # label <-> category id
            assert set(best.tolist()) == set(range(len(truth)))  # every GT box is matched by some anchor
            # background anchors carry the default box itself
            torch.testing.assert_close(box[~pos], anchors[~pos], atol=1e-5, rtol=0)
            checked += 1
    assert checked == 8


def _colour_of(img, left, top, right, bottom):
    patch = img[top:bottom, left:right]
    return patch.reshape(-1, 3).mean(0) if patch.size else None


def _assert_boxes_on_objects(img, box_xywh, label_ids):
    """The pixels inside each box have its object's colour; a strip just outside it is background."""
    for (cx, cy, w, h), cat in zip(box_xywh, label_ids, strict=True):
        l, t, r, b = ((cx - w / 2) * 300, (cy - h / 2) * 300, (cx + w / 2) * 300, (cy + h / 2) * 300)  # noqa: E741
        mx, my = 0.15 * (r - l) + 2, 0.15 * (b - t) + 2
        inside = _colour_of(img, int(l + mx), int(t + my), int(r - mx), int(b - my))
        np.testing.assert_allclose(inside, np.asarray(COLOURS[cat]) / 255, atol=0.08)
        for strip in (
            (int(l) - 7, int(t), int(l) - 4, int(b)),
            (int(r) + 4, int(t), int(r) + 7, int(b)),
            (int(l), int(t) - 7, int(r), int(t) - 4),
            (int(l), int(b) + 4, int(r), int(b) + 7),
        ):
            sl, st, sr, sb = strip
            if sl < 0 or st < 0 or sr > 300 or sb > 300:
                continue  # the box touches the image border there
            np.testing.assert_allclose(_colour_of(img, *strip), np.asarray(GREY) / 255, atol=0.08)


@pytest.fixture(scope="module")
def rectangles(tmp_path_factory):
    root = tmp_path_factory.mktemp("rects")
    objects = [
        (1, [(3, (20, 30, 50, 40)), (7, (120, 80, 60, 60))]),
        (2, [(7, (10, 90, 40, 50))]),
        (3, [(3, (130, 20, 45, 100)), (7, (30, 40, 30, 30))]),
        (4, [(3, (60, 60, 80, 50))]),
    ]
    return write_boxes_set(root, objects)


def test_flip_mirrors_image_and_boxes(rectangles):
    gt = _gt(rectangles)
    cats = CategoryMap.from_categories(load_json(ann_file(rectangles))["categories"])
    (images, boxes, labels, ids), *_ = run_pipeline(
        _train(rectangles, flip_probability=1.0, **NO_CROP, **NO_COLOUR)
    )
    for img, box, lab, iid in zip(
        denormalize(torch.from_numpy(np.stack(images))), boxes, labels, ids, strict=True
    ):
        pos = lab > 0
        found = np.unique(np.round(box[pos], 5), axis=0)
        truth = [b for _, b in gt[int(iid[0])]]
        expected = [[1 - (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0] for x0, y0, x1, y1 in truth]
        np.testing.assert_allclose(found, np.unique(np.round(expected, 5), axis=0), atol=1e-4)
        _assert_boxes_on_objects(
            img, box[pos], cats.to_dataset_id(torch.from_numpy(lab[pos]).long()).tolist()
        )


def test_random_crop_and_flip_keep_boxes_on_their_objects(rectangles):
    cats = CategoryMap.from_categories(load_json(ann_file(rectangles))["categories"])
    cropped = 0
    for images, boxes, labels, _ids in run_pipeline(_train(rectangles, seed=5, **NO_COLOUR), iterations=6):
        for img, box, lab in zip(denormalize(torch.from_numpy(np.stack(images))), boxes, labels, strict=True):
            pos = lab > 0
            uniq, idx = np.unique(np.round(box[pos], 5), axis=0, return_index=True)
            ids = cats.to_dataset_id(torch.from_numpy(lab[pos][idx]).long()).tolist()
            _assert_boxes_on_objects(img, uniq, ids)
            cropped += bool((uniq[:, 2:] > 0.45).any())  # magnified by a crop
    assert cropped > 0


def test_eval_pipeline_resizes_and_normalises_the_whole_image(synthetic_coco):
    doc = load_json(ann_file(synthetic_coco, "val"))
    names = {im["id"]: im["file_name"] for im in doc["images"]}
    (images, ids), *_ = run_pipeline(_eval(synthetic_coco))
    assert [int(i[0]) for i in ids] == sorted(names)[:4]  # file order, ids out
    for img, iid in zip(denormalize(torch.from_numpy(np.stack(images))), ids, strict=True):
        ref = Image.open(image_dir(synthetic_coco, "val") / names[int(iid[0])]).convert("RGB")
        ref = np.asarray(ref.resize((300, 300), Image.BILINEAR), np.float32) / 255
        assert np.abs(img - ref).mean() < 0.03


@pytest.mark.parametrize(
    "fmt, mode", [("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L")]
)
def test_grayscale_cmyk_and_png_images_decode_to_rgb(tmp_path, fmt, mode):
    objects = [(1, [(3, (20, 30, 50, 40))]), (2, [(7, (60, 50, 70, 60))])]
    root = write_boxes_set(tmp_path, objects, split="train", fmt=fmt, mode=mode)
    write_boxes_set(tmp_path, objects, split="val", fmt=fmt, mode=mode)
    (images, boxes, labels, _ids), *_ = run_pipeline(_train(root, batch_size=2, **NO_CROP, **NO_COLOUR))
    rgb = denormalize(torch.from_numpy(np.stack(images)))
    assert rgb.shape == (2, 300, 300, 3)
    if mode == "L":
        np.testing.assert_allclose(rgb[..., 0], rgb[..., 1], atol=0.02)  # grey in all three channels
    else:
        cats = CategoryMap.from_categories(load_json(ann_file(root))["categories"])
        for img, box, lab in zip(rgb, boxes, labels, strict=True):
            pos = lab > 0
            uniq, idx = np.unique(np.round(box[pos], 5), axis=0, return_index=True)
            _assert_boxes_on_objects(
                img, uniq, cats.to_dataset_id(torch.from_numpy(lab[pos][idx]).long()).tolist()
            )
    (images, ids), *_ = run_pipeline(_eval(root, batch_size=2))
    assert images[0].shape == (3, 300, 300)


def test_labels_follow_the_json_category_order(tmp_path, rectangles):
    """DALI remaps categories in file order, which is what CategoryMap records (even when not sorted by
    id)."""
    doc = load_json(ann_file(rectangles))
    doc["categories"] = doc["categories"][::-1]  # ids 7, 3
    save_json(tmp_path / "ann.json", doc)
    cats = CategoryMap.from_categories(doc["categories"])
    assert cats.dataset_ids == [7, 3]
    gt = _gt(rectangles)
    pipe = _train(rectangles, annotation_file=str(tmp_path / "ann.json"), flip_probability=0.0, **NO_CROP)
    (images, boxes, labels, ids), *_ = run_pipeline(pipe)
    for lab, iid in zip(labels, ids, strict=True):
        got = set(cats.to_dataset_id(torch.from_numpy(lab[lab > 0]).long()).tolist())
        assert got == {c for c, _ in gt[int(iid[0])]}
