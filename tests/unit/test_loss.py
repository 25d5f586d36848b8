"""MultiBoxLoss against a plain re-statement of NVIDIA SSD300 v1.1's ``Loss``
(NVIDIA's ``PyTorch/Detection/SSD/ssd/model.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from ssd_lightning.boxes import DefaultBoxes, make_default_boxes, ssd300_default_boxes
from ssd_lightning.loss import LossParts, MultiBoxLoss


def small_boxes() -> DefaultBoxes:
    """4x4x4 + 2x2x6 + 1x1x4 = 92 default boxes, the SSD300 recipe on a small grid."""
    return make_default_boxes(
        fig_size=300,
        feature_sizes=(4, 2, 1),
        steps=(75, 150, 300),
        scales=(45, 99, 153, 207),
        aspect_ratios=((2,), (2, 3), (2,)),
    )


def reference_loss(
    locs: torch.Tensor,
    confs: torch.Tensor,
    target_boxes: torch.Tensor,
    target_labels: torch.Tensor,
    anchors_xywh: torch.Tensor,
    neg_pos_ratio: int = 3,
) -> tuple[float, float]:
    """NVIDIA's loss, image by image and anchor by anchor, in float64. Returns (box part, class part)."""
    locs, confs, target_boxes, anchors = (
        locs.double(),
        confs.double(),
        target_boxes.double(),
        anchors_xywh.double(),
    )
    num_images, _, num_anchors = confs.shape
    box_parts, cls_parts = [], []
    for n in range(num_images):
        positives = [a for a in range(num_anchors) if target_labels[n, a] > 0]
        if not positives:  # contributes 0, still counts in the mean
            box_parts.append(0.0)
            cls_parts.append(0.0)
            continue
        box_sum = 0.0
        for a in positives:
            gx, gy, gw, gh = target_boxes[n, :, a].tolist()
            dx, dy, dw, dh = anchors[a].tolist()
            target = [10 * (gx - dx) / dw, 10 * (gy - dy) / dh, 5 * math.log(gw / dw), 5 * math.log(gh / dh)]
            for c in range(4):
                diff = abs(locs[n, c, a].item() - target[c])
                box_sum += 0.5 * diff**2 if diff < 1 else diff - 0.5
        # Cross-entropy per anchor: logsumexp over classes minus the target class's logit.
        ce = [
            torch.logsumexp(confs[n, :, a], 0).item() - confs[n, target_labels[n, a], a].item()
            for a in range(num_anchors)
        ]
        negatives = sorted((ce[a] for a in range(num_anchors) if a not in positives), reverse=True)
        hard_negatives = negatives[: min(neg_pos_ratio * len(positives), num_anchors)]
        cls_sum = sum(ce[a] for a in positives) + sum(hard_negatives)
        box_parts.append(box_sum / len(positives))
        cls_parts.append(cls_sum / len(positives))
    return sum(box_parts) / num_images, sum(cls_parts) / num_images


def random_batch(
    boxes: DefaultBoxes, positives_per_image: list[int], num_classes: int = 5, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random network outputs and box_encoder-like targets (unmatched anchors hold the anchor itself)."""
    generator = torch.Generator().manual_seed(seed)
    num_images, num_anchors = len(positives_per_image), len(boxes)
    locs = torch.randn(num_images, 4, num_anchors, generator=generator) * 2
    confs = torch.randn(num_images, num_classes, num_anchors, generator=generator) * 3
    target_boxes = boxes.xywh.t().repeat(num_images, 1, 1)
    target_labels = torch.zeros(num_images, num_anchors, dtype=torch.int64)
    for n, count in enumerate(positives_per_image):
        anchors = torch.randperm(num_anchors, generator=generator)[:count]
        target_labels[n, anchors] = torch.randint(1, num_classes, (count,), generator=generator)
        centres = torch.rand(2, count, generator=generator)
        sizes = torch.rand(2, count, generator=generator) * 0.8 + 0.05
        target_boxes[n, :, anchors] = torch.cat((centres, sizes))
    return locs, confs, target_boxes, target_labels


def test_matches_reference_on_random_batches() -> None:
    boxes = small_boxes()
    assert len(boxes) == 92
    loss = MultiBoxLoss(boxes)
    # 0 positives; few (3:1 mining active); 30 (3*30 > 62 negatives: every negative is selected); 1.
    for seed, positives in enumerate(([0, 5, 30, 1], [7, 0, 0, 2], [12, 20])):
        batch = random_batch(boxes, positives, seed=seed)
        parts = loss.components(*batch)
        box, cls = reference_loss(*batch, anchors_xywh=boxes.xywh)
        torch.testing.assert_close(parts.box, torch.tensor(box, dtype=torch.float32), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts.cls, torch.tensor(cls, dtype=torch.float32), rtol=1e-5, atol=1e-5)
        assert parts.total == parts.box + parts.cls
        assert loss(*batch) == parts.total
        assert parts.total.dtype == torch.float32 and parts.total.dim() == 0


def test_matches_reference_on_ssd300_boxes() -> None:
    loss = MultiBoxLoss()  # the 8732 SSD300 boxes
    batch = random_batch(ssd300_default_boxes(), [0, 4])
    box, cls = reference_loss(*batch, anchors_xywh=ssd300_default_boxes().xywh)
    parts = loss.components(*batch)
    torch.testing.assert_close(parts.box, torch.tensor(box, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.cls, torch.tensor(cls, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_no_positives_anywhere() -> None:
    boxes = small_boxes()
    locs, confs, target_boxes, target_labels = random_batch(boxes, [0, 0, 0])
    locs.requires_grad_(True)
    confs.requires_grad_(True)
    parts = MultiBoxLoss(boxes).components(locs, confs, target_boxes, target_labels)
    assert parts.box.item() == 0.0 and parts.cls.item() == 0.0 and parts.total.item() == 0.0
    parts.total.backward()
    assert locs.grad.eq(0).all() and confs.grad.eq(0).all()


def test_hard_negative_mining_picks_the_three_worst_negatives() -> None:
    # 2x2x4 + 1x1x2 = 18 anchors, 3 classes, one positive (anchor 0, class 2) in image 0; image 1 is empty.
    boxes = make_default_boxes(
        fig_size=300, feature_sizes=(2, 1), steps=(150, 300), scales=(60, 150, 240), aspect_ratios=((2,), ())
    )
    num_anchors = len(boxes)
    assert num_anchors == 18
    confs = torch.zeros(2, 3, num_anchors)
    confs[:, 0, :] = 5.0  # confident background everywhere: CE = log(e^5 + 2) - 5, small
    background_logit = {3: 0.0, 7: -1.0, 11: -2.0, 15: 1.0}  # less confident background: larger CE
    for anchor, logit in background_logit.items():
        confs[0, 0, anchor] = logit
    confs[0, :, 0] = torch.tensor([0.0, 1.0, 2.0])  # the positive's logits
    target_labels = torch.zeros(2, num_anchors, dtype=torch.int64)
    target_labels[0, 0] = 2
    target_boxes = boxes.xywh.t().repeat(2, 1, 1)
    cx, cy, w, h = boxes.xywh[0].tolist()
    target_boxes[0, 0, 0] = cx + 0.05 * w  # x offset 0.5 against predicted 0: smooth-L1 0.5 * 0.5^2 = 0.125
    locs = torch.zeros(2, 4, num_anchors)

    parts = MultiBoxLoss(boxes).components(locs, confs, target_boxes, target_labels)

    def ce_background(b: float) -> float:  # logits (b, 0, 0), target 0
        return math.log(math.exp(b) + 2) - b

    ce_positive = math.log(1 + math.e + math.e**2) - 2.0
    # neg_num = 3 * 1: anchors 11, 7, 3 (background logits -2, -1, 0); not anchor 15 (logit 1) nor the rest.
    cls_image0 = ce_positive + ce_background(-2.0) + ce_background(-1.0) + ce_background(0.0)
    assert parts.cls.item() == pytest.approx(cls_image0 / 2, rel=1e-6)  # image 1 counts in the mean with 0
    assert parts.box.item() == pytest.approx(0.125 / 2, rel=1e-5)
    # With a 2:1 ratio only anchors 11 and 7 are mined.
    parts2 = MultiBoxLoss(boxes, neg_pos_ratio=2).components(locs, confs, target_boxes, target_labels)
    assert parts2.cls.item() == pytest.approx(
        (ce_positive + ce_background(-2.0) + ce_background(-1.0)) / 2, rel=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_the_float32_value(dtype: torch.dtype) -> None:
    boxes = small_boxes()
    loss = MultiBoxLoss(boxes)
    locs, confs, target_boxes, target_labels = random_batch(boxes, [3, 0, 8])
    locs, confs = locs.to(dtype), confs.to(dtype)
    expected = loss(locs.float(), confs.float(), target_boxes, target_labels)
    got = loss(locs, confs, target_boxes.to(dtype).float(), target_labels)
    assert got.dtype == torch.float32
    assert got == loss(locs.float(), confs.float(), target_boxes.to(dtype).float(), target_labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(locs, confs, target_boxes, target_labels)
    assert under_autocast.dtype == torch.float32
    assert under_autocast == expected


def test_gradients_flow() -> None:
    boxes = small_boxes()
    locs, confs, target_boxes, target_labels = random_batch(boxes, [4, 0])
    locs = locs.half().requires_grad_(True)
    confs = confs.half().requires_grad_(True)
    MultiBoxLoss(boxes)(locs, confs, target_boxes, target_labels).backward()
    assert locs.grad.dtype == torch.float16 and confs.grad.dtype == torch.float16
    assert torch.isfinite(locs.grad).all() and torch.isfinite(confs.grad).all()
    positive = target_labels > 0
    # Box gradients exactly at the positives; class gradients at positives and mined negatives of image 0.
    assert torch.equal(locs.grad.abs().sum(dim=1) > 0, positive)
    assert int((confs.grad[0].abs().sum(dim=0) > 0).sum()) == 4 + 3 * 4
    assert confs.grad[1].eq(0).all()


def test_anchors_buffer_follows_device_not_checkpoint() -> None:
    loss = MultiBoxLoss()
    assert isinstance(loss.components(*random_batch(ssd300_default_boxes(), [1])), LossParts)
    assert loss.anchors.shape == (1, 4, 8732)
    assert "anchors" not in loss.state_dict() and len(loss.state_dict()) == 0
    assert "anchors" in dict(loss.named_buffers())
    assert not any(True for _ in loss.parameters())
    with pytest.raises(ValueError, match="8732 default boxes"):
        loss(*random_batch(small_boxes(), [1]))
