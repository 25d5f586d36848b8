"""ResNet trunks for SSD300 (NVIDIA SSD300 v1.1 ``class ResNet``).

A trunk is a torchvision ResNet cut after ``layer3`` (conv4_x): its first 7 children ``conv1, bn1, relu,
maxpool, layer1, layer2, layer3``, with every stride of the first ``layer3`` block set to 1, so a 300x300
image gives a 38x38 feature map. Nothing downloads: ImageNet weights come from the torch hub cache or a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models

# name -> (torchvision builder, weights enum, out_channels of the 6 SSD feature maps)
BACKBONES: dict[str, tuple[Callable[..., models.ResNet], type, tuple[int, ...]]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights, (256, 512, 512, 256, 256, 128)),
    "resnet34": (models.resnet34, models.ResNet34_Weights, (256, 512, 512, 256, 256, 256)),
    "resnet50": (models.resnet50, models.ResNet50_Weights, (1024, 512, 512, 256, 256, 256)),
    "resnet101": (models.resnet101, models.ResNet101_Weights, (1024, 512, 512, 256, 256, 256)),
    "resnet152": (models.resnet152, models.ResNet152_Weights, (1024, 512, 512, 256, 256, 256)),
}
IMAGENET_WEIGHTS = {"imagenet_v1": "IMAGENET1K_V1", "imagenet_v2": "IMAGENET1K_V2"}


class ResNet(nn.Module):
    """ResNet trunk: ``images [N,3,H,W] -> features [N, out_channels[0], H/8, W/8]`` (38x38 for 300x300).

    Args:
        name: one of ``resnet18, resnet34, resnet50, resnet101, resnet152``.
        weights: None (torchvision's random init), ``"imagenet_v1"`` / ``"imagenet_v2"`` (torchvision
            ``IMAGENET1K_V1/V2``, read from the torch hub cache, never downloaded) or the path of a local
            torchvision ResNet ``state_dict`` file.

    Attributes:
        feature_extractor: ``nn.Sequential`` of the 7 kept children (NVIDIA's key names).
        out_channels: channels of the 6 SSD feature maps (trunk output first, then the 5 extra blocks).
    """

    def __init__(self, name: str = "resnet50", weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")
        builder, _, out_channels = BACKBONES[name]
        resnet = builder(weights=None)
        if weights is not None:
            resnet.load_state_dict(backbone_state_dict(name, weights), strict=False)
        self.out_channels = list(out_channels)
        self.feature_extractor = nn.Sequential(*list(resnet.children())[:7])
        conv4_block1 = self.feature_extractor[-1][0]
        conv4_block1.conv1.stride = (1, 1)
        conv4_block1.conv2.stride = (1, 1)
        conv4_block1.downsample[0].stride = (1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(images)


def backbone_state_dict(name: str, weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trunk part (conv1 .. layer3) of a torchvision ResNet ``name`` state dict for ``weights``.

    See :class:`ResNet` for ``weights``; a local file may hold the whole ResNet (``layer4``, ``fc`` ignored).
    Raises FileNotFoundError / ValueError with a one-line message.
    """
    if str(weights) in IMAGENET_WEIGHTS:
        path = _hub_cache_file(name, str(weights))
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.backbone_weights file {path} not found: pass null, imagenet_v1, imagenet_v2 "
                f"or the path of a torchvision {name} state_dict"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"model.backbone_weights file {path} is not a torch state_dict: {_first_line(err)}"
        ) from None
    return _check_resnet_state(name, state, path)


def _hub_cache_file(name: str, version: str) -> Path:
    """Path of torchvision's cached ImageNet checkpoint, or a one-line error saying where to put it."""
    enum = BACKBONES[name][1]
    member = getattr(enum, IMAGENET_WEIGHTS[version], None)
    if member is None:
        raise ValueError(
            f"model.backbone_weights={version}: torchvision has no {IMAGENET_WEIGHTS[version]} weights for "
            f"{name}: use imagenet_v1"
        )
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(member.url)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.backbone_weights={version}: the {name} {IMAGENET_WEIGHTS[version]} weights are not in "
            "the torch hub cache and are never downloaded at run time; on a machine with internet, fetch "
            f"them ({member.url}) with {fetch_command(name, version, folder)} (on another machine, then copy "
            f"{path.name} to {folder}), "
            f"or pass model.backbone_weights=<path to a local {name} state_dict>"
        )
    return path


def fetch_command(name: str, version: str, folder: str | os.PathLike) -> str:
    """The one-line shell command that downloads ``name``'s ImageNet ``version`` weights into ``folder`` with
    torchvision's weights API (the file lands as ``folder/<the URL's file name>``, where the loader looks)."""
    enum = BACKBONES[name][1].__name__
    member = IMAGENET_WEIGHTS[version]
    return (
        f'python -c "from torchvision.models import {enum}; '
        f'{enum}.{member}.get_state_dict(model_dir={str(folder)!r})"'
    )


def _check_resnet_state(name: str, state: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    with torch.device("meta"):  # shapes only, no allocation or init
        full = BACKBONES[name][0]().state_dict()
    reference = {k: v for k, v in full.items() if not k.startswith(("layer4.", "fc."))}
    if not isinstance(state, dict) or not state:
        raise ValueError(f"model.backbone_weights file {path} does not hold a {name} state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = sorted(set(reference) - set(state))
    wrong = [k for k in reference if k in state and getattr(state[k], "shape", None) != reference[k].shape]
    if missing or wrong:
        bad = ", ".join((missing + wrong)[:4])
        raise ValueError(
            f"model.backbone_weights file {path} is not a torchvision {name} state_dict (keys: {bad} ...)"
        )
    return {k: state[k] for k in reference}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
