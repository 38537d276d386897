"""Cross entropy and focal loss.

ce:    -log p_y
focal: -(1 - p_y)^gamma log p_y                                   (Lin et al., ICCV 2017)

gamma = 0.5 is the value the robust-loss papers use as a baseline (Ma et al., ICML 2020,
"Normalized Loss Functions for Deep Learning with Noisy Labels"; Zhou et al., ICML 2021, ALF).
Their released code detaches the focal weight (1 - p_y)^gamma; here the gradient flows through
it, as in the formula.

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; \
print(build_loss('focal', 10)(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import RobustLoss, check_real, gather_target, one_minus_p, register


def focal_per_sample(logp: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    logp_y = gather_target(logp, target)
    return -(one_minus_p(logp_y) ** gamma) * logp_y


@register("ce")
class CrossEntropy(RobustLoss):
    """Plain cross entropy -log p_y."""

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="none")


@register("focal")
class FocalLoss(RobustLoss):
    """Focal loss -(1 - p_y)^gamma log p_y (Lin et al. 2017); gamma >= 0, gamma = 0 is CE."""

    def __init__(self, num_classes: int, gamma: float = 0.5) -> None:
        super().__init__(num_classes)
        self.gamma = check_real(self.name, "gamma", gamma, ge=0)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_per_sample(F.log_softmax(logits, dim=1), target, self.gamma)
