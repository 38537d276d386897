"""Symmetric cross entropy and the bounded "passive" losses RCE and MAE.

sce: alpha * CE + beta * RCE                         (Wang et al., ICCV 2019, "Symmetric Cross
     Entropy for Robust Learning with Noisy Labels"; CIFAR-10 alpha=0.1 beta=1, CIFAR-100 6, 0.1)
rce: -sum_k p_k log q_k with the one-hot label clamped to q_k >= 1e-4, i.e. A * (1 - p_y),
     A = -log(1e-4) (Wang et al. 2019; the passive loss of Ma et al., ICML 2020)
mae: ||p - e_y||_1 = 2 * (1 - p_y). The factor 2 matches the standalone MAE of the ALF code
     (Zhou et al., ICML 2021: MAELoss(scale=2.0)); the active+passive "nce+mae" combination uses
     the reduced MAE 1 - p_y, as both the APL (Ma et al. 2020) and ALF codes do (see
     active_passive.py).

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; \
print(build_loss('sce', 10, alpha=0.1, beta=1.0)(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])))"
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import RobustLoss, check_weights, gather_target, register, target_log_prob

# -log of the clamp applied to the zero entries of the one-hot label (Wang et al. 2019).
RCE_A = -math.log(1e-4)


def rce_per_sample(logp_y: torch.Tensor) -> torch.Tensor:
    # 1 - p_y via expm1: accurate when p_y is close to 1.
    return RCE_A * -torch.expm1(logp_y)


def reduced_mae_per_sample(logp_y: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(logp_y)


@register("rce")
class ReverseCrossEntropy(RobustLoss):
    """-log(1e-4) * (1 - p_y) (Wang et al. 2019)."""

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return rce_per_sample(target_log_prob(logits, target))


@register("mae")
class MeanAbsoluteError(RobustLoss):
    """||p - e_y||_1 = 2 (1 - p_y) (scaled by 2 as in the ALF code, Zhou et al. 2021)."""

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 2.0 * reduced_mae_per_sample(target_log_prob(logits, target))


@register("sce")
class SymmetricCrossEntropy(RobustLoss):
    """alpha * CE + beta * RCE (Wang et al. 2019); defaults are the CIFAR-10 values."""

    def __init__(self, num_classes: int, alpha: float = 0.1, beta: float = 1.0) -> None:
        super().__init__(num_classes)
        self.alpha, self.beta = check_weights(self.name, alpha, beta)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp_y = gather_target(F.log_softmax(logits, dim=1), target)
        return self.alpha * -logp_y + self.beta * rce_per_sample(logp_y)
