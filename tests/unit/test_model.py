"""SSD300 model: shapes, parameter counts, NVIDIA key names, anchor order, backbone weights."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from torchvision.models import resnet18

from ssd_lightning.boxes import FEATURE_SIZES, SCALES, STEPS, ssd300_default_boxes
from ssd_lightning.model import SSD300
from ssd_lightning.model.backbone import ResNet, fetch_command


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def r50() -> SSD300:
    torch.manual_seed(0)
    return SSD300().eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(1))


def test_default_model_matches_nvidia_parameter_table(r50):
    # our per-part counts of NVIDIA's ssd/model.py (ResNet-50): backbone, extra blocks, loc heads, conf heads
    assert n_params(r50) == 22_894_902
    assert n_params(r50.feature_extractor) == 8_543_296
    assert n_params(r50.additional_blocks) == 3_773_696
    assert n_params(r50.loc) == 497_784
    assert n_params(r50.conf) == 10_080_126
    assert (r50.backbone_name, r50.num_classes) == ("resnet50", 81)


def test_state_dict_keys_are_nvidia_names(r50):
    keys = r50.state_dict().keys()
    assert "feature_extractor.feature_extractor.0.weight" in keys  # conv1
    assert "feature_extractor.feature_extractor.6.0.downsample.0.weight" in keys  # layer3 block 0
    assert "feature_extractor.feature_extractor.6.5.conv3.weight" in keys
    assert "additional_blocks.4.3.weight" in keys and "additional_blocks.0.1.running_var" in keys
    assert {f"loc.{k}.bias" for k in range(6)} | {f"conf.{k}.weight" for k in range(6)} <= set(keys)
    assert not any(k.startswith(("feature_extractor.feature_extractor.7", "default_boxes")) for k in keys)
    assert len(r50.default_boxes) == 8732


def test_conv4_first_block_has_stride_one(r50):
    block = r50.feature_extractor.feature_extractor[6][0]
    assert block.conv1.stride == block.conv2.stride == block.downsample[0].stride == (1, 1)


def test_resnet50_forward_shapes_and_feature_sizes(r50, image):
    with torch.no_grad():
        maps = r50.features(image)
        locs, confs = r50(image)
    assert [m.shape[-2:] for m in maps] == [(s, s) for s in FEATURE_SIZES]
    assert [m.shape[1] for m in maps] == [1024, 512, 512, 256, 256, 256]
    assert locs.shape == (1, 4, 8732) and confs.shape == (1, 81, 8732)


@pytest.mark.parametrize(
    ("backbone", "num_classes", "channels"),
    [("resnet18", 3, [256, 512, 512, 256, 256, 128]), ("resnet34", 81, [256, 512, 512, 256, 256, 256])],
)
def test_small_backbones_forward(backbone, num_classes, channels, image):
    model = SSD300(backbone, num_classes=num_classes).eval()
    with torch.no_grad():
        maps = model.features(image)
        locs, confs = model(image)
    assert [m.shape[1] for m in maps] == channels == model.feature_extractor.out_channels
    assert [m.shape[-1] for m in maps] == list(FEATURE_SIZES)
    assert locs.shape == (1, 4, 8732) and confs.shape == (1, num_classes, 8732)


@pytest.mark.parametrize(
    ("backbone", "total", "trunk"),
    [
        ("resnet18", 14_048_310, 2_782_784),
        ("resnet34", 19_975_222, 8_170_304),
        ("resnet101", 41_887_030, 27_535_424),
        ("resnet152", 57_530_678, 43_179_072),
    ],
)
def test_backbone_parameter_counts(backbone, total, trunk):
    model = SSD300(backbone, num_classes=81)
    assert n_params(model) == total
    assert n_params(model.feature_extractor) == trunk
    assert [head.out_channels for head in model.conf] == [nd * 81 for nd in (4, 6, 6, 6, 4, 4)]


def test_other_class_count_changes_only_conf_heads():
    model = SSD300("resnet18", num_classes=11)
    assert [head.weight.shape[0] for head in model.conf] == [nd * 11 for nd in (4, 6, 6, 6, 4, 4)]
    assert n_params(model.conf) == 7_467_390 // 81 * 11  # conf parameters are linear in the class count
    assert n_params(model) - n_params(model.conf) == 14_048_310 - 7_467_390


def test_channels_last_input_gives_same_outputs(image):
    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=5).eval()
    with torch.no_grad():
        locs, confs = model(image)
        locs_cl, confs_cl = model(image.contiguous(memory_format=torch.channels_last))
        locs_m, confs_m = model.to(memory_format=torch.channels_last)(image)
    for out in (locs_cl, locs_m):
        torch.testing.assert_close(out, locs, rtol=1e-4, atol=1e-4)
    for out in (confs_cl, confs_m):
        torch.testing.assert_close(out, confs, rtol=1e-4, atol=1e-4)


def test_xavier_init_of_extra_blocks_and_heads():
    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=5)
    w = model.conf[0].weight  # xavier_uniform bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (w.shape[1] * 9 + w.shape[0] * 9))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert (model.additional_blocks[0][1].weight == 1).all()  # BN untouched


def test_head_channels_map_to_default_boxes_in_boxes_py_order(image):
    """Channel c of head k is class c // nd, box size c % nd; anchors run (map, size, row, col) as boxes.py"""
    num_classes = 3
    model = SSD300("resnet18", num_classes=num_classes).eval()
    maps = [model.feature_extractor, *model.additional_blocks]
    # replace each feature map by its cell index (i * W + j); each conf head passes it through + 1000 * c
    for module in maps:
        module.register_forward_hook(lambda _m, _i, out: _cell_index_map(out))
    with torch.no_grad():
        for head in model.conf:
            head.weight.zero_()
            head.weight[:, 0, 1, 1] = 1
            head.bias.copy_(1000 * torch.arange(head.out_channels))
        _, confs = model(image)
    boxes = ssd300_default_boxes()
    value = confs[0].round().long()  # [C, 8732]
    start = 0
    for k, size in enumerate(FEATURE_SIZES):
        nd = boxes.boxes_per_location[k]
        count = nd * size * size
        d, i, j = torch.meshgrid(torch.arange(nd), torch.arange(size), torch.arange(size), indexing="ij")
        for cls in range(num_classes):
            expected = 1000 * (cls * nd + d) + i * size + j
            assert torch.equal(value[cls, start : start + count], expected.flatten())
        # boxes.py puts the same (size d, row i, col j) at the same anchor index
        xywh = boxes.xywh[start : start + count].view(nd, size, size, 4)
        cells = 300 / STEPS[k]
        torch.testing.assert_close(xywh[..., 0], ((j + 0.5) / cells).float().clamp(0, 1))
        torch.testing.assert_close(xywh[..., 1], ((i + 0.5) / cells).float().clamp(0, 1))
        small, large = SCALES[k] / 300, SCALES[k + 1] / 300
        first_sizes = [(small, small), (math.sqrt(small * large),) * 2, (small * 2**0.5, small / 2**0.5)]
        for dd, (w, h) in enumerate(first_sizes):
            assert torch.allclose(xywh[dd, ..., 2:], torch.tensor([min(w, 1.0), min(h, 1.0)]))
        start += count
    assert start == 8732


def _cell_index_map(out: torch.Tensor) -> torch.Tensor:
    h, w = out.shape[-2:]
    index = torch.arange(h * w, dtype=out.dtype).view(1, 1, h, w)
    return torch.cat([index.expand(out.shape[0], 1, h, w), out[:, 1:].mul(0)], 1)


def test_detect_delegates_to_postprocess(image, monkeypatch):

    calls = []

    def fake_postprocess(locs, confs, default_boxes, **kwargs):
        calls.append((locs, confs, default_boxes, kwargs))
        return [
            {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
        ]

    monkeypatch.setattr("ssd_lightning.model.ssd300.postprocess", fake_postprocess)
    model = SSD300("resnet18", num_classes=3).eval()
    result = model.detect(image, score_threshold=0.2, iou_threshold=0.45, max_detections=7)
    (locs, confs, default_boxes, kwargs), expected = calls[0], model(image)
    assert len(calls) == 1 and len(result) == 1
    assert kwargs == {"score_threshold": 0.2, "iou_threshold": 0.45, "max_detections": 7}
    assert default_boxes is model.default_boxes and not locs.requires_grad
    torch.testing.assert_close((locs, confs), expected)


def test_detect_returns_one_sorted_dict_per_image(image):
    model = SSD300("resnet18", num_classes=3).eval()
    detections = model.detect(image.repeat(2, 1, 1, 1), max_detections=5)
    assert len(detections) == 2
    for det in detections:
        assert det["boxes"].shape == (5, 4) and det["scores"].shape == det["labels"].shape == (5,)
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert ((det["labels"] >= 1) & (det["labels"] <= 2)).all()


def test_unknown_backbone_is_one_clear_line():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'.*resnet18"):
        SSD300("resnet9")


def test_imagenet_weights_missing_from_hub_cache_raise_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        SSD300("resnet18", backbone_weights="imagenet_v1")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.backbone_weights=imagenet_v1: ")  # the config key a user sets
    assert "or pass model.backbone_weights=<path" in message
    assert "resnet18-f37072fd.pth" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert not (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()


def test_the_fetch_command_of_the_weights_error_puts_the_file_where_it_is_read(tmp_path, monkeypatch):
    """Run the error's one-line command as a user would on a machine with internet: only the transfer itself
    (torch.hub's download_url_to_file) is replaced by a copy of a local file; torchvision's weights API and
    torch.hub pick the file name and folder. Afterwards the same model loads those weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as err:
        SSD300("resnet18", backbone_weights="imagenet_v1")
    command = re.search(r'(python -c "(.*?)")', str(err.value))
    assert command and command.group(1) == fetch_command(
        "resnet18", "imagenet_v1", tmp_path / "torch/hub/checkpoints"
    )
    torch.manual_seed(5)
    reference = resnet18()
    served = tmp_path / "served.pth"
    torch.save(reference.state_dict(), served)
    urls = []

    def transfer(url, dst, *args, **kwargs):
        urls.append(url)
        shutil.copyfile(served, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", transfer)
    exec(command.group(2), {})  # the Python of `python -c "..."`
    assert urls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    model = SSD300("resnet18", backbone_weights="imagenet_v1")
    torch.testing.assert_close(model.feature_extractor.feature_extractor[0].weight, reference.conv1.weight)


def test_imagenet_weights_are_read_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(3)
    reference = resnet18()
    torch.save(reference.state_dict(), folder / "resnet18-f37072fd.pth")
    model = SSD300("resnet18", backbone_weights="imagenet_v1")
    torch.testing.assert_close(model.feature_extractor.feature_extractor[0].weight, reference.conv1.weight)


def test_imagenet_v2_does_not_exist_for_resnet18():
    with pytest.raises(ValueError, match="no IMAGENET1K_V2 weights for resnet18"):
        ResNet("resnet18", "imagenet_v2")


def test_local_backbone_state_dict_is_loaded_exactly(tmp_path):
    torch.manual_seed(4)
    reference = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = SSD300("resnet18", num_classes=3, backbone_weights=path)
    trunk = model.feature_extractor.feature_extractor.state_dict()
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    assert len(trunk) == len(expected)
    for (name, value), ref in zip(trunk.items(), expected.values(), strict=True):
        assert torch.equal(value, ref), name


def test_bad_local_backbone_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth not found"):
        ResNet("resnet18", tmp_path / "nope.pth")
    path = tmp_path / "r34.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="not a torchvision resnet34 state_dict"):
        ResNet("resnet34", path)
