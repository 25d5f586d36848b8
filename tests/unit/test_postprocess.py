"""postprocess against a restatement of NVIDIA's ``Encoder.decode_batch`` loop
(NVIDIA's ``PyTorch/Detection/SSD/ssd/utils.py``),
bit for bit with every NMS method; crafted cases with hand-computed detections; and the DALI ``box_encoder``
-> ``encode_offsets`` -> ``decode_offsets`` round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert, box_iou

from ssd_lightning.boxes import DefaultBoxes, decode_offsets, encode_offsets, ssd300_default_boxes
from ssd_lightning.postprocess import greedy_nms_padded, postprocess, suppression_matrix


def nvidia_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """NVIDIA's ``calc_iou_tensor(boxes, box[None])`` [M]."""
    lt = torch.max(boxes[:, :2], box[:2])
    rb = torch.min(boxes[:, 2:], box[2:])
    delta = rb - lt
    delta[delta < 0] = 0
    intersect = delta[:, 0] * delta[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_box = (box[2] - box[0]) * (box[3] - box[1])
    return intersect / (area + area_box - intersect)


def nvidia_decode(locs, confs, default_boxes, criteria=0.5, max_output=200, max_num=200, threshold=0.05):
    """Per image, per class greedy NMS as NVIDIA; returns (boxes, scores, labels) per image, best first."""
    anchors = default_boxes.xywh
    out = []
    for n in range(locs.shape[0]):
        loc = locs[n].t()
        xy = loc[:, :2] * 0.1 * anchors[:, 2:] + anchors[:, :2]
        wh = (loc[:, 2:] * 0.2).exp() * anchors[:, 2:]
        boxes = torch.cat((xy - 0.5 * wh, xy + 0.5 * wh), dim=1)
        probs = confs[n].t().softmax(dim=-1)  # [A, C], NVIDIA's layout
        all_boxes, all_scores, all_labels = [], [], []
        for label in range(1, confs.shape[1]):
            score = probs[:, label]
            mask = score > threshold
            class_boxes, class_scores = boxes[mask], score[mask]
            if class_scores.numel() == 0:
                continue
            remaining = class_scores.sort().indices[-max_num:]
            chosen = []
            while remaining.numel() > 0:
                best = remaining[-1]
                remaining = remaining[nvidia_iou(class_boxes[remaining], class_boxes[best]) < criteria]
                chosen.append(int(best))
            all_boxes.append(class_boxes[chosen])
            all_scores.append(class_scores[chosen])
            all_labels += [label] * len(chosen)
        if not all_boxes:
            out.append((torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)))
            continue
        scores = torch.cat(all_scores)
        order = scores.argsort()[-max_output:].flip(0)
        out.append((torch.cat(all_boxes)[order], scores[order], torch.tensor(all_labels)[order]))
    return out


def assert_nvidia_detections(got: list[dict], expected: list[tuple], exact: bool = True) -> None:
    assert len(got) == len(expected)
    for d, (boxes, scores, labels) in zip(got, expected, strict=True):
        assert set(d) == {"boxes", "scores", "labels"}
        assert d["boxes"].dtype == d["scores"].dtype == torch.float32 and d["labels"].dtype == torch.int64
        assert torch.equal(d["labels"], labels)
        if exact:  # NVIDIA's float32 operations: the same bits
            assert torch.equal(d["boxes"], boxes) and torch.equal(d["scores"], scores)
        else:
            torch.testing.assert_close(d["boxes"], boxes, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(d["scores"], scores, rtol=1e-6, atol=1e-7)
        assert d["scores"].diff().le(0).all()


def ssd_outputs(num_images: int, num_classes: int, seed: int, objects: int = 4):
    """SSD300-like outputs: confident background except around a few objects, plus noise candidates."""
    g = torch.Generator().manual_seed(seed)
    anchors = ssd300_default_boxes()
    locs = torch.randn(num_images, 4, 8732, generator=g) * 0.5
    confs = torch.randn(num_images, num_classes, 8732, generator=g)
    confs[:, 0] += 5.0
    for n in range(num_images):
        centre = torch.rand(objects, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(objects, 2, generator=g) * 0.3 + 0.05
        objs = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        from torchvision.ops import box_iou

        iou = box_iou(objs, anchors.ltrb)
        for o in range(objects):
            near = iou[o] > 0.2
            confs[n, 1 + o % (num_classes - 1), near] += 12 * iou[o, near]
    return locs, confs


def random_outputs(num_images: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    locs = torch.randn(num_images, 4, 8732, generator=generator) * 0.7
    confs = torch.randn(num_images, num_classes, 8732, generator=generator) * 2.5
    confs[0, 2] -= 20  # class 2 of image 0 never scores above 0.05
    return locs, confs


@pytest.mark.parametrize(
    ("iou_threshold", "max_detections", "candidates_per_class"), [(0.5, 200, 200), (0.45, 50, 120)]
)
def test_matches_nvidia_on_random_outputs(
    iou_threshold: float, max_detections: int, candidates_per_class: int
):
    boxes = ssd300_default_boxes()
    locs, confs = random_outputs(num_images=3, num_classes=6, seed=int(iou_threshold * 100))
    locs_before, confs_before = locs.clone(), confs.clone()
    got = postprocess(
        locs,
        confs,
        boxes,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        candidates_per_class=candidates_per_class,
    )
    expected = nvidia_decode(locs, confs, boxes, iou_threshold, max_detections, candidates_per_class)
    assert_nvidia_detections(got, expected)
    assert all(len(d["scores"]) > 0 for d in got)
    assert not (got[0]["labels"] == 2).any()
    assert torch.equal(locs, locs_before) and torch.equal(confs, confs_before)  # NVIDIA's modifies ploc


def test_low_precision_outputs_are_decoded_in_float32() -> None:
    boxes = ssd300_default_boxes()
    locs, confs = random_outputs(num_images=1, num_classes=4, seed=3)
    locs, confs = locs.half(), confs.half()
    got = postprocess(locs, confs, boxes)
    assert got[0]["boxes"].dtype == got[0]["scores"].dtype == torch.float32
    assert_nvidia_detections(got, nvidia_decode(locs.float(), confs.float(), boxes))


METHODS = ["auto", "sequential", "fixed_point", "kernel", "hybrid"]


@pytest.mark.parametrize("method", METHODS)
def test_batched_postprocess_is_nvidia_bit_for_bit(method):
    boxes = ssd300_default_boxes()
    locs, confs = ssd_outputs(num_images=3, num_classes=6, seed=1)
    confs[2] = -confs[2].abs()  # image 2: class scores everywhere (dense)
    confs[1, 0] += 30  # image 1: nothing above 0.05
    before = (locs.clone(), confs.clone())
    got = postprocess(locs, confs, boxes, nms_method=method)
    assert torch.equal(locs, before[0]) and torch.equal(confs, before[1])
    expected = nvidia_decode(locs, confs, boxes)
    assert [len(d["scores"]) for d in got][1] == 0 and len(got[0]["scores"]) > 0
    assert len(got[2]["scores"]) == 200  # the max_detections cut matters here
    assert_nvidia_detections(got, expected)


@pytest.mark.parametrize(
    ("iou", "max_detections", "candidates", "threshold"), [(0.45, 50, 120, 0.05), (0.3, 7, 3, 0.2)]
)
def test_batched_postprocess_arguments(iou, max_detections, candidates, threshold):
    boxes = ssd300_default_boxes()
    locs, confs = ssd_outputs(num_images=2, num_classes=5, seed=2)
    got = postprocess(
        locs,
        confs,
        boxes,
        score_threshold=threshold,
        iou_threshold=iou,
        max_detections=max_detections,
        candidates_per_class=candidates,
    )
    expected = nvidia_decode(locs, confs, boxes, iou, max_detections, candidates, threshold)
    assert_nvidia_detections(got, expected)
    assert all(len(d["scores"]) <= max_detections for d in got)


def test_batched_postprocess_low_precision_and_empty_outputs():
    boxes = ssd300_default_boxes()
    locs, confs = ssd_outputs(num_images=2, num_classes=4, seed=4)
    got = postprocess(locs.bfloat16(), confs.bfloat16(), boxes)
    assert_nvidia_detections(got, nvidia_decode(locs.bfloat16().float(), confs.bfloat16().float(), boxes))
    confs[:, 0] = 100.0
    for d in postprocess(locs, confs, boxes):
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,) and d["labels"].dtype == torch.int64
    assert all(len(d["scores"]) == 0 for d in postprocess(locs, confs, boxes, max_detections=0))


def test_crafted_iou_exactly_at_the_threshold_suppresses():
    """Dyadic boxes: IoU exactly 0.5 suppresses (NVIDIA keeps IoU < criteria only), 1/3 does not."""
    ltrb = torch.tensor(
        [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.75, 1.0]]
    )
    anchors = DefaultBoxes(box_convert(ltrb, "xyxy", "cxcywh"), ltrb, 0.1, 0.2, (4,))
    probs = torch.tensor([[0.4, 0.6], [0.45, 0.55], [0.1, 0.9], [0.2, 0.8]])  # (background, class 1)
    confs = probs.log().t().unsqueeze(0)
    locs = torch.zeros(1, 4, 4)
    for method in METHODS:
        (d,) = postprocess(locs, confs, anchors, nms_method=method)
        assert d["scores"].tolist() == pytest.approx([0.9, 0.8, 0.6])  # anchor 1 (IoU 0.5 with 0) dropped
        assert torch.equal(d["boxes"], ltrb[[2, 3, 0]])
        (d,) = postprocess(locs, confs, anchors, iou_threshold=0.5 + 1e-6, nms_method=method)
        assert len(d["scores"]) == 4


def test_greedy_nms_methods_agree_on_random_matrices():
    g = torch.Generator().manual_seed(5)
    boxes = torch.rand(40, 30, 2, generator=g)
    boxes = torch.cat([boxes, boxes + torch.rand(40, 30, 2, generator=g) * 0.4], dim=2)
    valid = torch.arange(30)[None, :] < torch.randint(0, 31, (40, 1), generator=g)
    suppress = suppression_matrix(boxes, 0.3)
    sizes = valid.sum(1)
    order = sizes.argsort(descending=True)
    seq = greedy_nms_padded(suppress[order], valid[order], "sequential", sizes[order].tolist())
    fixed = greedy_nms_padded(suppress[order], valid[order], "fixed_point")
    assert torch.equal(seq, fixed) and not (seq & ~valid[order]).any()
    # the plain greedy loop, group by group
    for row, g_ in enumerate(order.tolist()):
        kept: list[int] = []
        for j in range(int(sizes[g_])):
            if not any(bool(suppress[g_, i, j]) for i in kept):
                kept.append(j)
        assert seq[row].nonzero().flatten().tolist() == kept
    with pytest.raises(ValueError, match="unknown NMS method"):
        greedy_nms_padded(suppress, valid, "magic")


def test_nvidia_reference_sanity():
    """The restated NVIDIA loop keeps the best box of a class and drops an identical copy."""
    ltrb = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4]])
    anchors = DefaultBoxes(box_convert(ltrb, "xyxy", "cxcywh"), ltrb, 0.1, 0.2, (2,))
    confs = torch.tensor([[0.2, 0.8], [0.3, 0.7]]).log().t().unsqueeze(0)
    ((boxes, scores, labels),) = nvidia_decode(torch.zeros(1, 4, 2), confs, anchors)
    assert labels.tolist() == [1] and scores.tolist() == pytest.approx([0.8]) and not math.isnan(scores[0])


def crafted_boxes() -> DefaultBoxes:
    """Anchors with dyadic coordinates, so zero offsets decode to exactly these ltrb boxes."""
    ltrb = torch.tensor(
        [
            [0.0, 0.0, 0.5, 0.5],  # 0
            [0.0, 0.0, 0.5, 0.25],  # 1: IoU with 0 = 0.125 / 0.25 = 0.5 exactly
            [0.5, 0.5, 1.0, 1.0],  # 2: far from the others
            [0.0, 0.0, 0.5, 0.1875],  # 3: IoU with 0 = 0.375; with 1 = 0.75
            [0.25, 0.5, 0.75, 1.0],  # 4: IoU with 2 = 0.125 / 0.375 = 1/3
        ]
    )
    xywh = box_convert(ltrb, "xyxy", "cxcywh")
    return DefaultBoxes(xywh, ltrb, 0.1, 0.2, (5,))


def logits(probabilities: list[list[float]]) -> torch.Tensor:
    """[1, C, A] logits whose softmax over C gives these per-anchor probabilities (background first)."""
    return torch.tensor(probabilities).log().t().unsqueeze(0)


def test_crafted_detections() -> None:
    boxes = crafted_boxes()
    # Per anchor: (background, class 1, class 2, class 3).
    confs = logits(
        [
            [0.4, 0.6, 0.0, 0.0],  # anchor 0: class 1 at 0.6
            [0.35, 0.3, 0.35, 0.0],  # anchor 1: class 1 suppressed by anchor 0 (IoU 0.5); class 2 kept
            [0.1, 0.0, 0.0, 0.9],  # anchor 2: class 3 at 0.9
            [
                0.75,
                0.25,
                0.0,
                0.0,
            ],  # anchor 3: class 1, IoU 0.375 with anchor 0, kept (anchor 1 was suppressed)
            [0.2, 0.0, 0.0, 0.8],  # anchor 4: class 3, IoU 1/3 with anchor 2, kept
        ]
    )
    confs = torch.cat((confs, torch.zeros_like(confs)))
    confs[1, 0] = 10.0  # image 1: confident background everywhere (class scores 4.5e-5), no detections
    locs = torch.zeros(2, 4, 5)

    image0, image1 = postprocess(locs, confs, boxes)
    assert image0["labels"].tolist() == [3, 3, 1, 2, 1]
    assert image0["scores"].tolist() == pytest.approx([0.9, 0.8, 0.6, 0.35, 0.25], abs=1e-6)
    assert torch.equal(image0["boxes"], boxes.ltrb[[2, 4, 0, 1, 3]])
    assert (
        image1["boxes"].shape == (0, 4) and image1["scores"].shape == (0,) and image1["labels"].shape == (0,)
    )
    assert image1["labels"].dtype == torch.int64
    assert_nvidia_detections([image0, image1], nvidia_decode(locs, confs, boxes))

    # Lower NMS threshold: 1/3 and 0.375 now suppress (IoU >= threshold).
    (image0,) = postprocess(locs[:1], confs[:1], boxes, iou_threshold=1 / 3)
    assert image0["labels"].tolist() == [3, 1, 2]
    # Just above the IoU keeps the pair: anchor 1 stays in class 1 and now suppresses anchor 3 (IoU 0.75).
    (image0,) = postprocess(locs[:1], confs[:1], boxes, iou_threshold=0.5 + 1e-6)
    assert image0["labels"].tolist() == [3, 3, 1, 2, 1]
    assert torch.equal(image0["boxes"], boxes.ltrb[[2, 4, 0, 1, 1]])

    # max_detections truncates after the merge over classes; candidates_per_class before NMS, per class.
    (image0,) = postprocess(locs[:1], confs[:1], boxes, max_detections=2)
    assert image0["labels"].tolist() == [3, 3]
    (image0,) = postprocess(locs[:1], confs[:1], boxes, candidates_per_class=1)
    assert image0["labels"].tolist() == [3, 1, 2]


def test_score_exactly_at_threshold_is_dropped() -> None:
    boxes = crafted_boxes()
    confs = logits([[0.4, 0.6, 0.0, 0.0], [0.7, 0.0, 0.3, 0.0], [1.0, 0.0, 0.0, 0.0]] + [[1.0, 0, 0, 0]] * 2)
    locs = torch.zeros(1, 4, 5)
    score = confs[0].t().softmax(dim=-1)[1, 2].item()  # class 2 of anchor 1, ~0.3, in NVIDIA's [A, C] layout
    (strict,) = postprocess(locs, confs, boxes, score_threshold=score)
    assert strict["labels"].tolist() == [1]
    below = torch.nextafter(torch.tensor(score), torch.tensor(0.0)).item()  # the float32 just below
    (kept,) = postprocess(locs, confs, boxes, score_threshold=below)
    assert kept["labels"].tolist() == [1, 2] and kept["scores"][1].item() == score


def test_boxes_are_decoded_and_not_clipped() -> None:
    boxes = crafted_boxes()
    locs = torch.zeros(1, 4, 5)
    locs[0, :, 2] = torch.tensor([5.0, 0.0, math.log(3.0) / 0.2, 0.0])  # centre +0.25, width x3
    confs = logits([[1.0, 0, 0, 0]] * 2 + [[0.1, 0.9, 0.0, 0.0]] + [[1.0, 0, 0, 0]] * 2)
    (detections,) = postprocess(locs, confs, boxes)
    expected = torch.tensor([[0.25, 0.5, 1.75, 1.0]])  # cx 1.0, w 1.5: right edge 1.75, kept outside 0..1
    torch.testing.assert_close(detections["boxes"], expected)
    torch.testing.assert_close(detections["boxes"], decode_offsets(locs, boxes.xywh)[0, [2]])


def last_argmax(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Index of the maximum along ``dim``, the last one among equal maxima."""
    return values.shape[dim] - 1 - values.flip(dim).argmax(dim=dim)


def test_dali_box_encoder_round_trip() -> None:
    """DALI box_encoder targets, coded by encode_offsets and decoded by decode_offsets, give the GT back."""
    from nvidia.dali import fn, pipeline_def

    default_boxes = ssd300_default_boxes()
    gt_boxes = [
        np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8], [0.05, 0.6, 0.15, 0.75]], dtype=np.float32),
        np.array(
            [[0.48, 0.48, 0.5, 0.51], [0.0, 0.0, 1.0, 1.0]], dtype=np.float32
        ),  # tiny: forced match only
    ]
    gt_labels = [np.array([3, 7, 1], dtype=np.int32), np.array([5, 2], dtype=np.int32)]

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def encoder_pipeline():
        boxes, labels = fn.external_source(source=lambda: (gt_boxes, gt_labels), num_outputs=2, batch=True)
        encoded_boxes, encoded_labels = fn.box_encoder(
            boxes, labels, criteria=0.5, anchors=default_boxes.ltrb_list()
        )
        return encoded_boxes, encoded_labels

    pipe = encoder_pipeline()
    pipe.build()
    encoded_boxes, encoded_labels = pipe.run()

    anchors_xywh, anchors_ltrb = default_boxes.xywh, default_boxes.ltrb
    for sample, (gt, gt_label) in enumerate(zip(gt_boxes, gt_labels, strict=True)):
        target_xywh = torch.from_numpy(np.array(encoded_boxes[sample]))  # [8732, 4]
        target_labels = torch.from_numpy(np.array(encoded_labels[sample])).long()  # [8732]
        gt, gt_label = torch.from_numpy(gt), torch.from_numpy(gt_label).long()
        assert target_xywh.shape == (8732, 4) and target_labels.shape == (8732,)

        # Expected matching (NVIDIA's encode, DALI's tie rule): each GT's best anchor (the last of equals) is
        # forced, then each anchor takes its best GT (the last of equals) if the IoU is > 0.5.
        ious = box_iou(gt, anchors_ltrb)  # [G, A]
        best_anchor = last_argmax(ious, dim=1)  # [G]
        best_gt = last_argmax(ious, dim=0)  # [A]
        best_iou = ious.max(dim=0).values
        for g, anchor in enumerate(best_anchor.tolist()):
            best_iou[anchor], best_gt[anchor] = 2.0, g
        matched = best_iou > 0.5
        assert torch.equal(target_labels > 0, matched)
        assert torch.equal(target_labels[matched], gt_label[best_gt[matched]])
        assert torch.equal(target_labels[best_anchor], gt_label)  # every GT has its best anchor

        # Round trip through the project's offset coding (NVIDIA layout [1, 4, A]).
        offsets = encode_offsets(target_xywh.t().unsqueeze(0), anchors_xywh.t())
        assert torch.isfinite(offsets).all()
        decoded = decode_offsets(offsets, anchors_xywh)[0]  # [A, 4] ltrb
        torch.testing.assert_close(decoded[matched], gt[best_gt[matched]], rtol=0, atol=1e-5)
        # Unmatched anchors hold the anchor itself: zero offsets, label 0.
        torch.testing.assert_close(target_xywh[~matched], anchors_xywh[~matched], rtol=0, atol=1e-6)
        assert offsets[0][:, ~matched].abs().max() < 1e-4
        assert target_labels[~matched].eq(0).all()
    assert int((torch.from_numpy(np.array(encoded_labels[1])) > 0).sum()) >= 2  # the tiny box got its anchor
