"""Sparse regularization (Zhou, Liu, Wang, Zhai, Jiang & Ji, ICCV 2021, "Learning with Noisy Labels
via Sparse Regularization"; journal version 2023; code github.com/hitcszx/lnl_sr).

    z_bar = z / ||z||_2                           (logit normalization, L2 over classes)
    L = L_base(z_bar / tau, y) + lam_t * sum_k softmax(z_bar / tau)_k^p,   lam_t = lam * rho^epoch

The p-norm term (p <= 1) pushes the output towards one-hot, the normalization bounds the logits;
lam grows by rho every epoch (`set_epoch`). Defaults are the authors' CIFAR-10 CE+SR values
(tau=0.5, p=0.1, lam=1.2, rho=1.03). `base` is any other registered loss name, built with
`base_params` (e.g. the authors' GCE+SR uses base="gce", base_params={"q": 0.01}).
softmax^p is computed as exp(p * log_softmax), which needs no clamp (the authors clamp at 1e-7).

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; l = build_loss('sr', 10); \
l.set_epoch(10, 120); print(l.lam_t, l(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])))"
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import LOSSES, RobustLoss, check_real, instantiate, register


@register("sr")
class SparseRegularization(RobustLoss):
    """Base loss on normalized, temperature-scaled logits plus a growing p-norm penalty."""

    def __init__(
        self,
        num_classes: int,
        base: str = "ce",
        tau: float = 0.5,
        p: float = 0.1,
        lam: float = 1.2,
        rho: float = 1.03,
        base_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes)
        if not isinstance(base, str) or base not in LOSSES or base == self.name:
            valid = ", ".join(sorted(n for n in LOSSES if n != self.name))
            raise ValueError(
                f"{self.name}: parameter 'base' must be a registered loss other than 'sr' (got {base!r}); valid: {valid}"
            )
        if base_params is not None and not isinstance(base_params, dict):
            raise ValueError(
                f"{self.name}: parameter 'base_params' must be a dict of the base loss's parameters (got {base_params!r})"
            )
        self.base = base
        self.base_params = dict(base_params or {})
        self.tau = check_real(self.name, "tau", tau, gt=0)
        self.p = check_real(self.name, "p", p, gt=0, le=1)
        self.lam = check_real(self.name, "lam", lam, ge=0)
        self.rho = check_real(self.name, "rho", rho, gt=0)
        self.lam_t = self.lam
        self.base_loss = instantiate(base, num_classes, self.base_params)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        super().set_epoch(epoch, total_epochs)
        self.lam_t = self.lam * self.rho**self.epoch
        self.base_loss.set_epoch(epoch, total_epochs)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scaled = F.normalize(logits, dim=1) / self.tau
        loss = self.base_loss.compute(scaled, target)
        if self.lam_t > 0:
            loss = loss + self.lam_t * torch.exp(self.p * F.log_softmax(scaled, dim=1)).sum(dim=1)
        return loss
