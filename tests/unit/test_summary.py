"""model_summary reproduces the original SSD300 project's README figures for SSD300-ResNet-50."""

from __future__ import annotations

from ssd_lightning.model import SSD300
from ssd_lightning.model.summary import ModelSummary, count_flops, model_summary


def test_resnet50_summary_matches_the_seed():
    model = SSD300()  # train mode: the count runs in eval mode and restores the mode
    summary = model_summary(model)
    assert model.training
    assert (summary.layers, summary.parameters, summary.gradients) == (173, 22_894_902, 22_894_902)
    # thop convention: conv multiply-adds 20,150,906,112 + conv bias adds 742,220 + eval BN 2 x 30,581,248
    assert summary.flops == 20_212_810_828
    assert abs(summary.flops - 20.213e9) / 20.213e9 < 0.01
    assert str(summary).splitlines() == [
        "Model FLOPs: 20.213G Params: 22.895M",
        "Model summary: 173 layers, 22894902 parameters, 22894902 gradients",
    ]


def test_gradients_count_only_trainable_parameters():
    model = SSD300("resnet18", num_classes=3)
    model.feature_extractor.requires_grad_(False)
    summary = model_summary(model)
    trunk = sum(p.numel() for p in model.feature_extractor.parameters())
    assert summary.gradients == summary.parameters - trunk
    assert summary.layers == len(list(model.modules()))


def test_flops_scale_with_class_count_only_in_conf_heads():
    # conf head k costs (9 * c_in + 1) * nd * C * H * W multiply-adds; 2 more classes add that for C = 2
    few, more = count_flops(SSD300("resnet18", num_classes=3)), count_flops(SSD300("resnet18", num_classes=5))
    channels, sizes, nds = [256, 512, 512, 256, 256, 128], [38, 19, 10, 5, 3, 1], [4, 6, 6, 6, 4, 4]
    assert more - few == sum(
        (9 * c + 1) * nd * 2 * s * s for c, s, nd in zip(channels, sizes, nds, strict=True)
    )


def test_str_uses_thop_suffixes():
    assert str(ModelSummary(3, 1_234_567, 0, 999)).splitlines()[0] == "Model FLOPs: 999.000B Params: 1.235M"
