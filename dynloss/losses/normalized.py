"""Normalized losses (Ma et al., ICML 2020, "Normalized Loss Functions for Deep Learning with
Noisy Labels"): a loss divided by its sum over all possible labels, which makes it robust.

nce: (-log p_y) / sum_k (-log p_k)
nfl: FL_y / sum_k FL_k, FL_k = -(1 - p_k)^gamma log p_k

The APL code detaches the normalizer and the focal weight of NFL; here the gradient flows through
both, as in the formula.

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; \
print(build_loss('nfl', 10, gamma=0.5)(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import RobustLoss, check_real, gather_target, one_minus_p, register


def nce_per_sample(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # sum_k -log p_k >= C log C > 0, so the division is always safe.
    return gather_target(logp, target) / logp.sum(dim=1)


def nfl_per_sample(logp: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    fl = -(one_minus_p(logp) ** gamma) * logp  # (B, C), every entry >= 0, the row sum > 0
    return gather_target(fl, target) / fl.sum(dim=1)


@register("nce")
class NormalizedCrossEntropy(RobustLoss):
    """CE normalized over all labels (Ma et al. 2020)."""

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nce_per_sample(F.log_softmax(logits, dim=1), target)


@register("nfl")
class NormalizedFocalLoss(RobustLoss):
    """Focal loss normalized over all labels (Ma et al. 2020); gamma >= 0."""

    def __init__(self, num_classes: int, gamma: float = 0.5) -> None:
        super().__init__(num_classes)
        self.gamma = check_real(self.name, "gamma", gamma, ge=0)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nfl_per_sample(F.log_softmax(logits, dim=1), target, self.gamma)
