"""torchvision ImageNet architectures as ``Classifier``s: resnet18, resnet34, resnet50, vgg19_bn.

The network's last linear layer becomes ``nn.Identity`` (so ``features`` ends at the penultimate layer:
pooled 512/2048 for ResNets, the 4096-wide second hidden layer for VGG) and a fresh ``fc`` is the head.
``in_chans != 3`` replaces the first conv; with pretrained weights it starts from the RGB filters summed
(one channel) or repeated and rescaled by 3/in_chans (timm's ``adapt_input_conv`` rule), so activations keep
their scale (exactly, for a grey image, when in_chans is 1 or a multiple of 3).
Pretrained weights: torchvision's IMAGENET1K_V1, loaded offline-safely (dynloss/models/pretrained.py).

    python -c "from dynloss.models import build_model; import torch; m = build_model('resnet18', 50).eval(); print(m(torch.zeros(1, 3, 64, 64)).shape)"
"""
from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import nn

from .classifier import Classifier
from .pretrained import torchvision_state_dict
from .registry import register_model


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB first-conv filters (O, 3, k, k) -> (O, in_chans, k, k), keeping the scale of the response."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _new_conv(old: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                     bias=old.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(adapt_input_conv(old.weight, in_chans))
        if old.bias is not None:
            conv.bias.copy_(old.bias)
    return conv


def _build(name: str, ctor, weights, num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    net = ctor(weights=None)
    if pretrained:
        net.load_state_dict(torchvision_state_dict(name, weights))
    return net


def _resnet(name: str, ctor, weights):
    def builder(num_classes: int, in_chans: int = 3, pretrained: bool = False) -> Classifier:
        net = _build(name, ctor, weights, num_classes, in_chans, pretrained)
        if in_chans != 3:
            net.conv1 = _new_conv(net.conv1, in_chans)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return Classifier(net, dim, num_classes)
    return builder


def _vgg(name: str, ctor, weights):
    def builder(num_classes: int, in_chans: int = 3, pretrained: bool = False) -> Classifier:
        net = _build(name, ctor, weights, num_classes, in_chans, pretrained)
        if in_chans != 3:
            net.features[0] = _new_conv(net.features[0], in_chans)
        dim = net.classifier[-1].in_features
        net.classifier[-1] = nn.Identity()
        return Classifier(net, dim, num_classes)
    return builder


for _name, _ctor, _weights, _kind in [
    ("resnet18", tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, _resnet),
    ("resnet34", tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, _resnet),
    ("resnet50", tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, _resnet),
    ("vgg19_bn", tvm.vgg19_bn, tvm.VGG19_BN_Weights.IMAGENET1K_V1, _vgg),
]:
    register_model(_name)(_kind(_name, _ctor, _weights))
