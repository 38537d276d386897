"""A small CNN for 28x28 (MNIST, Fashion-MNIST) and 8x8 (sklearn digits) images; about 0.42M parameters.

Two 3x3 conv + batch-norm + ReLU + 2x2 max-pool stages (32, 64 channels), the whole 7x7 map flattened (other
input sizes are resampled to 7x7 by adaptive average pooling), then a 128-wide hidden layer that is the feature
vector the ``fc`` head reads: the model of DESIGN.md section 8's calibration loop (docs/plain_loop.py). An
earlier version pooled the map to 4x4 into a 64-wide layer and cost ~5 points of top-1 on Fashion-MNIST-LT
(docs/method.md).

    python -c "from dynloss.models import build_model; import torch; print(build_model('small_cnn', 10, in_chans=1)(torch.zeros(2, 1, 28, 28)).shape)"
"""
from __future__ import annotations

from torch import nn

from .classifier import Classifier
from .registry import register_model

SPATIAL = 7  # the map a 28x28 image leaves after two 2x2 pools: kept whole (no pooling it away)


def small_cnn_backbone(in_chans: int = 1, widths=(32, 64), hidden: int = 128) -> nn.Sequential:
    c1, c2 = widths
    return nn.Sequential(
        nn.Conv2d(in_chans, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
        # ceil_mode keeps a 1-pixel map (from 2x2 or 3x3 inputs) from vanishing
        nn.MaxPool2d(2, ceil_mode=True),
        # identity on 28x28 inputs; other sizes are resampled to the same 7x7 grid
        nn.AdaptiveAvgPool2d(SPATIAL), nn.Flatten(),
        nn.Linear(c2 * SPATIAL * SPATIAL, hidden), nn.ReLU(inplace=True),
    )


@register_model("small_cnn")
def small_cnn(num_classes: int, in_chans: int = 3, pretrained: bool = False) -> Classifier:
    if pretrained:
        raise ValueError("small_cnn has no pretrained weights; use pretrained=False")
    return Classifier(small_cnn_backbone(in_chans), 128, num_classes)
