"""Dynamics-aware loss (Li, Xia, Zhu, Liu, Zhang & Liu, "Dynamics-Aware Loss for Learning with
Label Noise", Pattern Recognition 2023, arXiv:2303.11562; code github.com/XiuchuanLi/DAL).

At epoch t of T (0-based, set through `set_epoch(t, T)`):
    q(t)      = q_start + (q_end - q_start) * t / T          GCE exponent: fit first, robust later
    t0        = (1 - q_start) * T / (q_end - q_start)        the epoch where q(t) passes 1
    lambda(t) = max(0, (t - t0) / (T - t0))                  bootstrapping weight, 0 before t0
    L = (1 - p_y^q) / q + lambda * H(p) / (q ln C),          H(p) = -sum_k p_k log p_k

The authors' scripts build one criterion per epoch with exactly these expressions; CIFAR uses
q_start=0.6, q_end=1.5 and (mini-)WebVision q_start=0.4, q_end=1.5. Requires 0 < q_start < q_end
and q_end > 1 (otherwise q never reaches 1 and t0 >= T). Before any set_epoch call the loss is at
t = 0: q = q_start, lambda = 0.

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; l = build_loss('dal', 10); \
l.set_epoch(140, 150); print(l.q, l.lam, l(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])))"
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import RobustLoss, check_real, gather_target, register
from .gce import gce_per_sample


def dal_schedule(q_start: float, q_end: float, epoch: int, total_epochs: int) -> tuple[float, float]:
    """(q(t), lambda(t)) at 0-based `epoch` of `total_epochs`."""
    q = q_start + (q_end - q_start) * epoch / total_epochs
    t0 = (1.0 - q_start) * total_epochs / (q_end - q_start)
    lam = max(0.0, (epoch - t0) / (total_epochs - t0))
    return q, lam


@register("dal")
class DynamicsAwareLoss(RobustLoss):
    """GCE with a rising exponent plus a late entropy (bootstrapping) term (Li et al. 2023)."""

    def __init__(self, num_classes: int, q_start: float = 0.6, q_end: float = 1.5) -> None:
        super().__init__(num_classes)
        self.q_start = check_real(self.name, "q_start", q_start, gt=0)
        self.q_end = check_real(self.name, "q_end", q_end, gt=1)
        if self.q_end <= self.q_start:
            raise ValueError(
                f"{self.name}: parameter 'q_end' must be > q_start={self.q_start:g} (got {q_end!r}); q rises over training"
            )
        self.q, self.lam = self.q_start, 0.0

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        super().set_epoch(epoch, total_epochs)
        self.q, self.lam = dal_schedule(self.q_start, self.q_end, self.epoch, self.total_epochs)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=1)
        loss = gce_per_sample(gather_target(logp, target), self.q)
        if self.lam > 0:
            entropy = -(logp.exp() * logp).sum(dim=1)
            loss = loss + self.lam * entropy / (self.q * math.log(self.num_classes))
        return loss
