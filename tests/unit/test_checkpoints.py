"""load_model / read_checkpoint: NVIDIA DeepLearningExamples files, train.py checkpoints, clear errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from torchvision.models import resnet18

from ssd_lightning import load_model as public_load_model
from ssd_lightning.checkpoints import (
    CheckpointError,
    infer_backbone,
    infer_num_classes,
    load_model,
    read_checkpoint,
)
from ssd_lightning.checkpoints.reading import LAYER3
from ssd_lightning.model import SSD300

NAMES = ["person", "bicycle", "car", "motorcycle"]


@pytest.fixture(scope="module")
def model() -> SSD300:
    """A resnet18 SSD300 with 5 classes and non-trivial BN statistics (so buffers must load too)."""
    torch.manual_seed(0)
    net = SSD300("resnet18", num_classes=5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return net.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(1))


def assert_same_outputs(a: SSD300, b: SSD300, image: torch.Tensor) -> None:
    with torch.no_grad():
        for x, y in zip(a(image), b(image), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_nvidia_checkpoint_with_module_prefix(model, image, tmp_path):
    path = tmp_path / "nvidia.pt"
    label_map = {0: "background", **{i + 1: name for i, name in enumerate(NAMES)}}
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(
        {"model": state, "label_map": label_map, "epoch": 65, "iteration": 1000, "optimizer": {}}, path
    )

    loaded = load_model(path)
    assert not loaded.training
    assert (loaded.backbone_name, loaded.num_classes) == ("resnet18", 5)
    assert_same_outputs(model, loaded, image)
    info = read_checkpoint(path)
    assert info.class_names == NAMES and info.category_ids is None


def test_lightning_checkpoint_round_trip(model, image, tmp_path):
    path = tmp_path / "last.ckpt"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["loss.default_boxes"] = torch.zeros(8732, 4)  # other LightningModule state is ignored
    hparams = {"backbone": "resnet18", "num_classes": 5, "category_ids": [1, 2, 3, 4], "class_names": NAMES}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 3, "global_step": 10}, path)

    info = read_checkpoint(path)
    assert (info.backbone, info.num_classes, info.category_ids, info.class_names) == (
        "resnet18",
        5,
        [1, 2, 3, 4],
        NAMES,
    )
    loaded = public_load_model(str(path))
    assert not loaded.training
    assert_same_outputs(model, loaded, image)


def test_bare_state_dict_loads(model, image, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    assert_same_outputs(model, load_model(path), image)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.ckpt"
    with pytest.raises(CheckpointError, match="nowhere.ckpt not found"):
        load_model(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(torch.randn(3, 4), id="tensor"),
        pytest.param(resnet18().state_dict(), id="foreign-state-dict"),
        pytest.param({"model": {"conv.weight": torch.zeros(1)}}, id="foreign-model-key"),
        pytest.param(b"not a torch file", id="garbage-bytes"),
    ],
)
def test_not_an_ssd300_checkpoint(content, tmp_path):
    path = tmp_path / "thing.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not an SSD300 checkpoint") and "\n" not in message
    assert isinstance(err.value, ValueError)


def test_pickled_objects_are_refused_by_weights_only(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(
        CheckpointError, match="pickled argparse.Namespace, which torch.load\\(weights_only=True"
    ):
        read_checkpoint(path)


def test_mismatched_keys_are_listed_in_one_line(model, tmp_path):
    state = dict(model.state_dict())
    del state["loc.3.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["additional_blocks.0.0.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "broken.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for part in (
        "missing keys (1): loc.3.bias",
        "unexpected keys (1): extra.weight",
        "additional_blocks.0.0.weight",
    ):
        assert part in message


def test_backbone_inference_from_real_state_dicts(model):
    assert infer_backbone(model.state_dict()) == "resnet18"
    assert infer_num_classes(model.state_dict()) == 5
    r50 = SSD300("resnet50", num_classes=81).state_dict()
    assert infer_backbone(r50) == "resnet50" and infer_num_classes(r50) == 81


@pytest.mark.parametrize(
    ("bottleneck", "blocks", "name"),
    [
        (False, 2, "resnet18"),
        (False, 6, "resnet34"),
        (True, 6, "resnet50"),
        (True, 23, "resnet101"),
        (True, 36, "resnet152"),
    ],
)
def test_backbone_inference_from_layer3_blocks(bottleneck, blocks, name):
    convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    state = {f"{LAYER3}{b}.{conv}.weight": torch.zeros(1) for b in range(blocks) for conv in convs}
    assert infer_backbone(state) == name


def test_unknown_trunk_is_reported():
    state = {f"{LAYER3}{b}.conv1.weight": torch.zeros(1) for b in range(4)}
    with pytest.raises(CheckpointError, match="4 basic blocks in layer3"):
        infer_backbone(state, "x.pt")
