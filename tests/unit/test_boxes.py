"""Pin the SSD300 default boxes and the offset coding to NVIDIA SSD300 v1.1's values
(NVIDIA's ``PyTorch/Detection/SSD/ssd/utils.py``, ``dboxes300_coco``)."""

from __future__ import annotations

import math

import pytest
import torch

from ssd_lightning.boxes import decode_offsets, encode_offsets, make_default_boxes, ssd300_default_boxes

# First index of each feature map's boxes: 38x38x4, 19x19x6, 10x10x6, 5x5x6, 3x3x4, 1x1x4.
MAP_COUNTS = (5776, 2166, 600, 150, 36, 4)
MAP_STARTS = (0, 5776, 7942, 8542, 8692, 8728)


def box(index: int) -> list[float]:
    return ssd300_default_boxes().xywh[index].tolist()


def test_counts() -> None:
    boxes = ssd300_default_boxes()
    assert len(boxes) == 8732
    assert boxes.xywh.shape == boxes.ltrb.shape == (8732, 4)
    assert boxes.boxes_per_location == (4, 6, 6, 6, 4, 4)
    counts = [
        size * size * n for size, n in zip((38, 19, 10, 5, 3, 1), boxes.boxes_per_location, strict=True)
    ]
    assert counts == list(MAP_COUNTS)
    assert [sum(MAP_COUNTS[:k]) for k in range(6)] == list(MAP_STARTS)
    assert (boxes.scale_xy, boxes.scale_wh) == (0.1, 0.2)
    assert len(boxes.ltrb_list()) == 8732 * 4


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        # cx = cy = 0.5 / (300 / step); w = h = scales[k] / 300 (the first size of each map is (sk1, sk1)).
        (0, (0.5 / 37.5, 0.5 / 37.5, 21 / 300, 21 / 300)),  # (0.01333, 0.01333, 0.07, 0.07)
        (5776, (0.5 / 18.75, 0.5 / 18.75, 45 / 300, 45 / 300)),  # 0.15
        (7942, (0.5 / 9.375, 0.5 / 9.375, 99 / 300, 99 / 300)),  # 0.33
        (8542, (0.5 / 4.6875, 0.5 / 4.6875, 153 / 300, 153 / 300)),  # 0.51
        (8692, (0.5 / 3.0, 0.5 / 3.0, 207 / 300, 207 / 300)),  # 0.69
        (8728, (0.5, 0.5, 261 / 300, 261 / 300)),  # 0.87
    ],
)
def test_first_box_of_each_map(start: int, expected: tuple[float, ...]) -> None:
    assert box(start) == pytest.approx(expected, abs=1e-6)


def test_sizes_in_order() -> None:
    # 38x38 map: (0.07, 0.07), sqrt(0.07 * 0.15) = 0.1025, (0.07 * sqrt2, 0.07 / sqrt2) = (0.099, 0.0495),
    # and swapped.
    cell_count = 38 * 38
    assert box(1 * cell_count)[2:] == pytest.approx((math.sqrt(0.07 * 0.15),) * 2, abs=1e-6)
    assert math.sqrt(0.07 * 0.15) == pytest.approx(0.1025, abs=1e-4)
    assert box(2 * cell_count)[2:] == pytest.approx((0.07 * math.sqrt(2), 0.07 / math.sqrt(2)), abs=1e-6)
    assert box(3 * cell_count)[2:] == pytest.approx((0.07 / math.sqrt(2), 0.07 * math.sqrt(2)), abs=1e-6)
    # 19x19 map, ar=3: (0.15 * sqrt3, 0.15 / sqrt3) = (0.2598, 0.0866).
    assert box(5776 + 4 * 361)[2:] == pytest.approx((0.15 * math.sqrt(3), 0.15 / math.sqrt(3)), abs=1e-6)
    # Order within a size: row i, then column j (cx varies fastest).
    assert box(1)[:2] == pytest.approx((1.5 / 37.5, 0.5 / 37.5), abs=1e-6)
    assert box(38)[:2] == pytest.approx((0.5 / 37.5, 1.5 / 37.5), abs=1e-6)


def test_clamping_in_xywh() -> None:
    boxes = ssd300_default_boxes()
    # 10x10 map, last column: cx = 9.5 / 9.375 = 1.0133 -> 1 (all 6 sizes x 10 rows); cy on the last row.
    assert 9.5 / 9.375 == pytest.approx(1.0133, abs=1e-4)
    last_column = [7942 + s * 100 + i * 10 + 9 for s in range(6) for i in range(10)]
    last_row = [7942 + s * 100 + 9 * 10 + j for s in range(6) for j in range(10)]
    assert boxes.xywh[last_column, 0].eq(1).all()
    assert boxes.xywh[last_row, 1].eq(1).all()
    # The ltrb copy is derived from the clamped centre: r = 1 + w / 2 for the first size (w 0.33).
    assert boxes.ltrb[7942 + 9, 2].item() == pytest.approx(1 + 0.33 / 2, abs=1e-6)
    # 1x1 map, ar=2: (0.87 * sqrt2, 0.87 / sqrt2) = (1.2304, 0.6152) -> (1, 0.6152) and its transpose.
    assert 0.87 * math.sqrt(2) == pytest.approx(1.2304, abs=1e-4)
    assert box(8730) == pytest.approx((0.5, 0.5, 1.0, 0.87 / math.sqrt(2)), abs=1e-6)
    assert box(8731) == pytest.approx((0.5, 0.5, 0.87 / math.sqrt(2), 1.0), abs=1e-6)
    assert boxes.xywh.min() >= 0 and boxes.xywh.max() <= 1
    # The values NVIDIA's ``dboxes.clamp_(0, 1)`` changes, 122 entries:
    # 60 cx + 60 cy (10x10 map) + 1 w + 1 h (1x1 map), the clamped tensor
    # entries (in 116 boxes); no other map leaves 0..1 (5x5: cx <= 4.5 / 4.6875 = 0.96; 3x3: cx <= 2.5 / 3).
    on_bound = boxes.xywh.eq(1)
    clamped = torch.zeros_like(on_bound)
    clamped[last_column, 0] = True
    clamped[last_row, 1] = True
    clamped[8730, 2] = clamped[8731, 3] = True
    assert int(clamped.sum()) == 122
    assert int(clamped.any(dim=1).sum()) == 116
    # Besides those, only the 38x38 map's last column/row sits on 1, unclamped: cx = 37.5 / 37.5 exactly.
    exact_one = torch.zeros_like(on_bound)
    exact_one[[s * 1444 + i * 38 + 37 for s in range(4) for i in range(38)], 0] = True
    exact_one[[s * 1444 + 37 * 38 + j for s in range(4) for j in range(38)], 1] = True
    assert torch.equal(on_bound, clamped | exact_one)
    assert boxes.xywh.gt(0).all()  # no box was clamped at 0


def test_ltrb_is_not_clamped() -> None:
    boxes = ssd300_default_boxes()
    # Extremes: 5x5 map, ar=3 box (w 0.51 * sqrt3 = 0.8833) at cx = 0.5 / 4.6875 = 0.1067 and
    # cx = 4.5 / 4.6875 = 0.96.
    w = 153 / 300 * math.sqrt(3)
    assert boxes.ltrb.min().item() == pytest.approx(0.5 / 4.6875 - w / 2, abs=1e-6)
    assert boxes.ltrb.max().item() == pytest.approx(4.5 / 4.6875 + w / 2, abs=1e-6)
    assert boxes.ltrb.min().item() == pytest.approx(-0.335, abs=1e-3)
    assert boxes.ltrb.max().item() == pytest.approx(1.40, abs=2e-3)
    xywh = boxes.xywh
    expected = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), dim=1)
    torch.testing.assert_close(boxes.ltrb, expected)


def test_tiny_config() -> None:
    tiny = make_default_boxes(
        fig_size=300, feature_sizes=(2, 1), steps=(150, 300), scales=(60, 150, 240), aspect_ratios=((2,), ())
    )
    assert len(tiny) == 2 * 2 * 4 + 1 * 1 * 2
    assert tiny.boxes_per_location == (4, 2)
    assert tiny.xywh[0].tolist() == pytest.approx((0.25, 0.25, 0.2, 0.2))
    assert tiny.xywh[-1].tolist() == pytest.approx((0.5, 0.5, math.sqrt(0.5 * 0.8), math.sqrt(0.5 * 0.8)))


def test_encode_decode_round_trip() -> None:
    anchors = ssd300_default_boxes().xywh  # [A, 4]
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(2, 2, 8732, generator=generator)
    sizes = torch.rand(2, 2, 8732, generator=generator) * 0.9 + 0.05
    boxes_xywh = torch.cat((centres, sizes), dim=1)  # [N, 4, A]
    offsets = encode_offsets(boxes_xywh, anchors.t())
    assert offsets.shape == (2, 4, 8732)
    decoded = decode_offsets(offsets, anchors)  # [N, A, 4] ltrb
    expected = torch.cat((centres - sizes / 2, centres + sizes / 2), dim=1).permute(0, 2, 1)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)
    # An anchor encodes to zero offsets.
    assert encode_offsets(anchors.t(), anchors.t()).abs().max() == 0
    # Hand-computed: centre shifted by one anchor width, size doubled -> (1 / 0.1, 0, log 2 / 0.2, 0).
    anchor = torch.tensor([[0.5], [0.5], [0.2], [0.1]])
    target = torch.tensor([[0.7], [0.5], [0.4], [0.1]])
    torch.testing.assert_close(
        encode_offsets(target, anchor).flatten(), torch.tensor([10.0, 0.0, math.log(2) / 0.2, 0.0])
    )
