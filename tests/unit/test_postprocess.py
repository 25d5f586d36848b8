"""postprocess against a plain re-statement of NVIDIA's ``Encoder.decode_batch`` (reference section 3.3),
crafted cases with hand-computed detections, and the DALI ``box_encoder`` -> ``encode_offsets`` ->
``decode_offsets`` round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from ssd_lightning.boxes import DefaultBoxes, decode_offsets, encode_offsets, ssd300_default_boxes
from ssd_lightning.postprocess import postprocess


def iou_nvidia(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU [M] of ltrb ``boxes`` [M, 4] with one ltrb ``box`` [4], NVIDIA's ``calc_iou_tensor`` formula."""
    lt = torch.max(boxes[:, :2], box[:2])
    rb = torch.min(boxes[:, 2:], box[2:])
    delta = (rb - lt).clamp(min=0)
    intersect = delta[:, 0] * delta[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_box = (box[2] - box[0]) * (box[3] - box[1])
    return intersect / (area + area_box - intersect)


def reference_decode(
    locs: torch.Tensor,
    confs: torch.Tensor,
    default_boxes: DefaultBoxes,
    criteria: float = 0.5,
    max_output: int = 200,
    max_num: int = 200,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """NVIDIA's decode_batch/decode_single, one image and one class at a time. Returns (boxes, scores, labels)
    per image, sorted by score descending (NVIDIA returns ascending)."""
    anchors = default_boxes.xywh
    results = []
    for n in range(locs.shape[0]):
        loc = locs[n].t()  # [A, 4]
        xy = 0.1 * loc[:, :2] * anchors[:, 2:] + anchors[:, :2]
        wh = (0.2 * loc[:, 2:]).exp() * anchors[:, 2:]
        boxes = torch.cat((xy - 0.5 * wh, xy + 0.5 * wh), dim=1)
        probs = confs[n].softmax(dim=0)  # [C, A]
        out_boxes, out_scores, out_labels = [], [], []
        for label in range(1, confs.shape[1]):
            score = probs[label]
            mask = score > 0.05
            class_boxes, class_scores = boxes[mask], score[mask]
            if class_scores.numel() == 0:
                continue
            remaining = class_scores.argsort()[-max_num:]  # ascending, the best max_num
            chosen = []
            while remaining.numel() > 0:
                best = remaining[-1]
                ious = iou_nvidia(class_boxes[remaining], class_boxes[best])
                remaining = remaining[ious < criteria]  # NVIDIA keeps IoU < criteria (itself: IoU 1, dropped)
                chosen.append(int(best))
            out_boxes.append(class_boxes[chosen])
            out_scores.append(class_scores[chosen])
            out_labels += [label] * len(chosen)
        if not out_boxes:
            results.append((torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)))
            continue
        all_boxes, all_scores = torch.cat(out_boxes), torch.cat(out_scores)
        order = all_scores.argsort()[-max_output:].flip(0)
        results.append((all_boxes[order], all_scores[order], torch.tensor(out_labels)[order]))
    return results


def assert_same_detections(got: list[dict], expected: list[tuple]) -> None:
    assert len(got) == len(expected)
    for detections, (boxes, scores, labels) in zip(got, expected, strict=True):
        assert set(detections) == {"boxes", "scores", "labels"}
        assert detections["labels"].dtype == torch.int64
        assert torch.equal(detections["labels"], labels)
        torch.testing.assert_close(detections["scores"], scores, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(detections["boxes"], boxes, rtol=1e-6, atol=1e-6)
        assert detections["scores"].diff().le(0).all()


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
    expected = reference_decode(locs, confs, boxes, iou_threshold, max_detections, candidates_per_class)
    assert_same_detections(got, expected)
    assert all(len(d["scores"]) > 0 for d in got)
    assert not (got[0]["labels"] == 2).any()
    assert torch.equal(locs, locs_before) and torch.equal(confs, confs_before)  # NVIDIA's modifies ploc


def test_low_precision_outputs_are_decoded_in_float32() -> None:
    boxes = ssd300_default_boxes()
    locs, confs = random_outputs(num_images=1, num_classes=4, seed=3)
    locs, confs = locs.half(), confs.half()
    got = postprocess(locs, confs, boxes)
    assert got[0]["boxes"].dtype == got[0]["scores"].dtype == torch.float32
    assert_same_detections(got, reference_decode(locs.float(), confs.float(), boxes))


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
    assert_same_detections([image0, image1], reference_decode(locs, confs, boxes))

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
    score = confs.softmax(dim=1)[0, 2, 1].item()  # the class-2 score, ~0.3, as postprocess computes it
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
    import numpy as np
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
