"""Generalized cross entropy (Zhang & Sabuncu, NeurIPS 2018, "Generalized Cross Entropy Loss for
Training Deep Neural Networks with Noisy Labels").

gce: (1 - p_y^q) / q, q > 0 (q -> 0 gives CE, q = 1 gives MAE's 1 - p_y); q = 0.7 in the paper.

p_y^q is computed as exp(q log p_y) from log_softmax, so no clamp of p is needed (the authors'
code clamps p at 1e-7, a difference below 1e-4 in the loss value).

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; \
print(build_loss('gce', 10, q=0.7)(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])))"
"""

from __future__ import annotations

import torch

from .base import RobustLoss, check_real, register, target_log_prob


def gce_per_sample(logp_y: torch.Tensor, q: float) -> torch.Tensor:
    return -torch.expm1(q * logp_y) / q


@register("gce")
class GeneralizedCrossEntropy(RobustLoss):
    """(1 - p_y^q) / q (Zhang & Sabuncu 2018)."""

    def __init__(self, num_classes: int, q: float = 0.7) -> None:
        super().__init__(num_classes)
        self.q = check_real(self.name, "q", q, gt=0)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return gce_per_sample(target_log_prob(logits, target), self.q)
