"""A small CNN for 28x28 (MNIST, Fashion-MNIST) and 8x8 (sklearn digits) images; about 0.1M parameters.

Two 3x3 conv + batch-norm + ReLU + 2x2 max-pool stages (32, 64 channels), adaptive average pooling to 4x4 (so
any input size of at least 4x4 works; smaller maps are upsampled by the pooling), then a 64-wide hidden
layer that is the feature vector the ``fc`` head reads. The model of DESIGN.md section 8's calibration runs.

    python -c "from dynloss.models import build_model; import torch; print(build_model('small_cnn', 10, in_chans=1)(torch.zeros(2, 1, 28, 28)).shape)"
"""
from __future__ import annotations

from torch import nn

from .classifier import Classifier
from .registry import register_model


def small_cnn_backbone(in_chans: int = 1, widths=(32, 64), hidden: int = 64) -> nn.Sequential:
    c1, c2 = widths
    return nn.Sequential(
        nn.Conv2d(in_chans, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
        # ceil_mode keeps a 1-pixel map (from 2x2 or 3x3 inputs) from vanishing
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(c2 * 16, hidden), nn.ReLU(inplace=True),
    )


@register_model("small_cnn")
def small_cnn(num_classes: int, in_chans: int = 3, pretrained: bool = False) -> Classifier:
    if pretrained:
        raise ValueError("small_cnn has no pretrained weights; use pretrained=False")
    return Classifier(small_cnn_backbone(in_chans), 64, num_classes)
