"""``Classifier``: a feature extractor plus one linear head, the shape every dynloss model has.

The meta step's ``head`` scope differentiates through ``.fc`` only, on ``.features(x)`` detached
(dynloss/meta.py), so the split between the two is part of the interface.

    python -c "from dynloss.models import build_model; m = build_model('resnet32', 10); print(m.fc)"
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Classifier(nn.Module):
    """``forward(x) = fc(features(x))``; ``features(x)`` is the pooled (B, D) representation.

    ``forward(x, return_features=True)`` returns ``(logits, features)`` from one pass.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.backbone(x), 1)

    def forward(self, x: Tensor, return_features: bool = False):
        feats = self.features(x)
        logits = self.fc(feats)
        return (logits, feats) if return_features else logits
