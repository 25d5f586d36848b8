"""The fast path (ssd_lightning.fastpath): batched post-processing equals NVIDIA's per-image, per-class loop
and the project's reference post-processing; compile / channels_last give eager's outputs; the optimizer
kernel switch; host-sync accounting; the Lightning callback."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torchvision.ops import box_convert

from ssd_lightning.boxes import DefaultBoxes, ssd300_default_boxes
from ssd_lightning.fastpath import (
    FastPathCallback,
    HostSyncCounter,
    compile_module,
    greedy_nms_padded,
    postprocess_batched,
    set_optimizer_impl,
    suppression_matrix,
)
from ssd_lightning.model import SSD300
from ssd_lightning.postprocess import postprocess

# ------------------------------------------------------------------------------------------------------
# NVIDIA's decode (DeepLearningExamples SSD300 v1.1 Encoder.decode_batch / decode_single), restated
# ------------------------------------------------------------------------------------------------------


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


METHODS = ["auto", "sequential", "fixed_point", "kernel", "hybrid"]


@pytest.mark.parametrize("method", METHODS)
def test_batched_postprocess_is_nvidia_bit_for_bit(method):
    boxes = ssd300_default_boxes()
    locs, confs = ssd_outputs(num_images=3, num_classes=6, seed=1)
    confs[2] = -confs[2].abs()  # image 2: class scores everywhere (dense)
    confs[1, 0] += 30  # image 1: nothing above 0.05
    before = (locs.clone(), confs.clone())
    got = postprocess_batched(locs, confs, boxes, nms_method=method)
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
    got = postprocess_batched(
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


def test_batched_postprocess_equals_the_reference_postprocess():
    boxes = ssd300_default_boxes()
    locs, confs = ssd_outputs(num_images=4, num_classes=9, seed=3)
    fast = postprocess_batched(locs, confs, boxes)
    reference = postprocess(locs, confs, boxes)
    for a, b in zip(fast, reference, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-6, atol=1e-7)  # softmax order


def test_batched_postprocess_low_precision_and_empty_outputs():
    boxes = ssd300_default_boxes()
    locs, confs = ssd_outputs(num_images=2, num_classes=4, seed=4)
    got = postprocess_batched(locs.bfloat16(), confs.bfloat16(), boxes)
    assert_nvidia_detections(got, nvidia_decode(locs.bfloat16().float(), confs.bfloat16().float(), boxes))
    confs[:, 0] = 100.0
    for d in postprocess_batched(locs, confs, boxes):
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,) and d["labels"].dtype == torch.int64
    assert all(len(d["scores"]) == 0 for d in postprocess_batched(locs, confs, boxes, max_detections=0))


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
        (d,) = postprocess_batched(locs, confs, anchors, nms_method=method)
        assert d["scores"].tolist() == pytest.approx([0.9, 0.8, 0.6])  # anchor 1 (IoU 0.5 with 0) dropped
        assert torch.equal(d["boxes"], ltrb[[2, 3, 0]])
        (d,) = postprocess_batched(locs, confs, anchors, iou_threshold=0.5 + 1e-6, nms_method=method)
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


# ------------------------------------------------------------------------------------------------------
# Model switches
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=3).eval()
    # BatchNorm with non-trivial statistics, so the comparison exercises them
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def test_channels_last_gives_eager_outputs(tiny_model):
    images = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        locs, confs = tiny_model(images)
        model_cl = SSD300("resnet18", num_classes=3).eval()
        model_cl.load_state_dict(tiny_model.state_dict())
        model_cl = model_cl.to(memory_format=torch.channels_last)
        locs_cl, confs_cl = model_cl(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(locs_cl, locs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(confs_cl, confs, rtol=1e-4, atol=1e-4)


def test_torch_compile_gives_eager_outputs_and_keeps_state_dict_keys(tiny_model):
    """Inductor on the CPU (needs a C++ compiler): resnet18 SSD300, 3 classes, batch 1."""
    images = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(2))
    eager = SSD300("resnet18", num_classes=3).eval()
    eager.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        locs, confs = eager(images)
    keys = list(eager.state_dict())
    compiled = compile_module(eager)
    assert compiled is eager and list(compiled.state_dict()) == keys  # no _orig_mod. prefix
    start = time.perf_counter()
    with torch.no_grad():
        locs_c, confs_c = compiled(images)
    assert time.perf_counter() - start < 300
    torch.testing.assert_close(locs_c, locs, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(confs_c, confs, rtol=1e-3, atol=1e-3)
    detections = postprocess_batched(locs_c, confs_c, compiled.default_boxes)
    reference = postprocess_batched(locs, confs, eager.default_boxes)
    assert [len(d["scores"]) for d in detections] == [len(d["scores"]) for d in reference]


@pytest.mark.parametrize("impl", ["loop", "foreach", "fused", "auto"])
def test_optimizer_kernel_switch_gives_the_same_step(impl):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    grads = [torch.randn_like(p) for p in params]

    def step(impl_name):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = torch.optim.SGD(
            [{"params": ps[:1], "weight_decay": 5e-4}, {"params": ps[1:], "weight_decay": 0.0}],
            lr=0.1,
            momentum=0.9,
        )
        if impl_name is not None:
            set_optimizer_impl(opt, impl_name)
        for _ in range(3):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    reference, _ = step(None)
    got, opt = step(impl)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    expected = {
        "loop": (False, False),
        "foreach": (True, False),
        "fused": (False, True),
        "auto": (None, None),
    }
    assert all((g["foreach"], g["fused"]) == expected[impl] for g in opt.param_groups)
    assert getattr(opt, "_step_supports_amp_scaling", False) is (impl == "fused")
    with pytest.raises(ValueError, match="fastpath.optimizer"):
        set_optimizer_impl(opt, "turbo")


def test_host_sync_counter_counts_scalar_reads_and_data_dependent_shapes():
    x = torch.randn(100)
    with HostSyncCounter() as counter:
        y = x * 2 + 1  # no sync
        assert counter.total == 0
        _ = y.sum().item()
        _ = bool(y.max() > 0)
        _ = y[y > 0]  # boolean mask: data-dependent size
    assert counter.counts.get("item", 0) == 2
    assert counter.total >= 3


def test_fast_path_callback_validates_and_sets_flags(monkeypatch):
    with pytest.raises(ValueError, match="fastpath.optimizer"):
        FastPathCallback(optimizer="warp")
    before = torch.backends.cudnn.benchmark
    try:
        callback = FastPathCallback(cudnn_benchmark=True)
        module = torch.nn.Module()
        callback.setup(None, module, "fit")  # type: ignore[arg-type]
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_fast_path_callback_switches_the_lightning_optimizer(tmp_path):
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.model(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            group = trainer.optimizers[0].param_groups[0]
            seen.append((group["foreach"], group["fused"]))

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[FastPathCallback(optimizer="fused"), Probe()],
    )
    data = torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4)
    trainer.fit(Tiny(), data)
    assert seen == [(False, True), (False, True)]


def test_nvidia_reference_sanity():
    """The restated NVIDIA loop keeps the best box of a class and drops an identical copy."""
    ltrb = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4]])
    anchors = DefaultBoxes(box_convert(ltrb, "xyxy", "cxcywh"), ltrb, 0.1, 0.2, (2,))
    confs = torch.tensor([[0.2, 0.8], [0.3, 0.7]]).log().t().unsqueeze(0)
    ((boxes, scores, labels),) = nvidia_decode(torch.zeros(1, 4, 2), confs, anchors)
    assert labels.tolist() == [1] and scores.tolist() == pytest.approx([0.8]) and not math.isnan(scores[0])
