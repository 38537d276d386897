"""timm architectures as ``Classifier``s: inception_resnet_v2 (the WebVision model of the Dynamic Loss paper).

``timm.create_model(name, num_classes=0, in_chans=...)`` returns pooled features (1536 for
Inception-ResNet-v2); a fresh ``fc`` is the head. Inputs must be at least 75x75. Pretrained weights come
from the Hugging Face cache (dynloss/models/pretrained.py explains the offline behaviour).

    python -c "from dynloss.models import build_model; import torch; m = build_model('inception_resnet_v2', 50).eval(); print(m(torch.zeros(1, 3, 75, 75)).shape)"
"""
from __future__ import annotations

from .classifier import Classifier
from .pretrained import bounded_download, timm_pretrained_overlay
from .registry import register_model


def _timm(name: str):
    def builder(num_classes: int, in_chans: int = 3, pretrained: bool = False) -> Classifier:
        import timm  # imported on use: timm pulls in a lot that the small models never need

        if pretrained:
            overlay = timm_pretrained_overlay(name)
            with bounded_download(name):
                net = timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_chans,
                                        pretrained_cfg_overlay=overlay or None)
        else:
            net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
        return Classifier(net, net.num_features, num_classes)
    return builder


for _name in ("inception_resnet_v2",):
    register_model(_name)(_timm(_name))
