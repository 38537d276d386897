"""Asymmetric loss functions (Zhou et al., ICML 2021, "Asymmetric Loss Functions for Learning with
Noisy Labels"; code github.com/hitcszx/ALFs).

agce: ((a + 1)^q - (a + p_y)^q) / q,  a > 0, q > 0
aul:  ((a - p_y)^q - (a - 1)^q) / q,  a > 1, q > 0
ael:  exp(-p_y / a),                  a > 0

Defaults are the authors' CIFAR-10 values (agce a=0.6 q=0.6; aul a=5.5 q=3; ael a=2.5). The bases
a + p_y and a - p_y stay >= min(a, a - 1) > 0, so no clamping is needed.

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; \
print(build_loss('aul', 10, preset='cifar10')(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])))"
"""

from __future__ import annotations

import torch

from .base import RobustLoss, check_real, register, target_log_prob


def agce_per_sample(p_y: torch.Tensor, a: float, q: float) -> torch.Tensor:
    return ((a + 1.0) ** q - (a + p_y) ** q) / q


def aul_per_sample(p_y: torch.Tensor, a: float, q: float) -> torch.Tensor:
    return ((a - p_y) ** q - (a - 1.0) ** q) / q


def ael_per_sample(p_y: torch.Tensor, a: float) -> torch.Tensor:
    return torch.exp(-p_y / a)


@register("agce")
class AsymmetricGCE(RobustLoss):
    """Asymmetric generalized cross entropy (Zhou et al. 2021)."""

    def __init__(self, num_classes: int, a: float = 0.6, q: float = 0.6) -> None:
        super().__init__(num_classes)
        self.a = check_real(self.name, "a", a, gt=0)
        self.q = check_real(self.name, "q", q, gt=0)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return agce_per_sample(target_log_prob(logits, target).exp(), self.a, self.q)


@register("aul")
class AsymmetricUnhingedLoss(RobustLoss):
    """Asymmetric unhinged loss (Zhou et al. 2021); a > 1."""

    def __init__(self, num_classes: int, a: float = 5.5, q: float = 3.0) -> None:
        super().__init__(num_classes)
        self.a = check_real(self.name, "a", a, gt=1)
        self.q = check_real(self.name, "q", q, gt=0)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return aul_per_sample(target_log_prob(logits, target).exp(), self.a, self.q)


@register("ael")
class AsymmetricExponentialLoss(RobustLoss):
    """Asymmetric exponential loss (Zhou et al. 2021)."""

    def __init__(self, num_classes: int, a: float = 2.5) -> None:
        super().__init__(num_classes)
        self.a = check_real(self.name, "a", a, gt=0)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ael_per_sample(target_log_prob(logits, target).exp(), self.a)
