"""ResNet-32 for 32x32 inputs (He et al. 2016, section 4.2), as in the LDAM-DRW and Dynamic Loss code.

Three stages of 16/32/64 channels with 5 basic blocks each (6n+2 layers, n = 5), option-A shortcuts
(stride-2 subsampling plus zero channel padding: no parameters), Kaiming-normal init of every conv and linear
weight, global average pooling (adaptive, so other input sizes work too). About 0.46M parameters at 10 classes.

    python -c "from dynloss.models import build_model; import torch; print(build_model('resnet32', 10)(torch.zeros(2, 3, 32, 32)).shape)"
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .classifier import Classifier
from .registry import register_model


class _PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the channels (a module, not a lambda, so models pickle)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The backbone up to global average pooling; output (B, 64)."""

    def __init__(self, blocks_per_stage: int = 5, in_chans: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, w, stride=2 if (i > 0 and b == 0) else 1))
                in_planes = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_planes

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.layers(F.relu(self.bn1(self.conv1(x)))))


def _kaiming(m: nn.Module) -> None:
    # LDAM's _weights_init: kaiming_normal_ (fan_in, ReLU gain) on conv and linear weights only
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight)


def cifar_resnet(depth: int, num_classes: int, in_chans: int = 3) -> Classifier:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    backbone = CifarResNet((depth - 2) // 6, in_chans)
    model = Classifier(backbone, backbone.out_dim, num_classes)
    model.apply(_kaiming)
    return model


@register_model("resnet32")
def resnet32(num_classes: int, in_chans: int = 3, pretrained: bool = False) -> Classifier:
    if pretrained:
        raise ValueError("resnet32 has no pretrained weights; use pretrained=False")
    return cifar_resnet(32, num_classes, in_chans)
