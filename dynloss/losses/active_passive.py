"""Active + passive combinations: alpha * active + beta * passive.

From Ma et al., ICML 2020 ("Normalized Loss Functions for Deep Learning with Noisy Labels", APL):
  nce+rce, nce+mae, nfl+rce
From Zhou et al., ICML 2021 ("Asymmetric Loss Functions for Learning with Noisy Labels", ALF):
  nce+agce, nce+aul, nce+ael

The passive term of nce+mae is the *reduced* MAE 1 - p_y (both authors' codes build it as
MeanAbsoluteError(scale=beta) with mae = 1 - p_y), i.e. half the standalone `mae` loss; this keeps
the authors' alpha/beta presets meaningful. Every other term is the registered loss of that name.
Defaults are the authors' CIFAR-10 values.

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; \
print(build_loss('nce+agce', 10, alpha=1, beta=4, a=6, q=1.5)(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .asymmetric import ael_per_sample, agce_per_sample, aul_per_sample
from .base import RobustLoss, check_real, check_weights, gather_target, register
from .normalized import nce_per_sample, nfl_per_sample
from .symmetric import rce_per_sample, reduced_mae_per_sample


class ActivePassive(RobustLoss):
    """alpha * active(logp, target) + beta * passive(logp_y); subclasses fill both in."""

    def __init__(self, num_classes: int, alpha: float, beta: float) -> None:
        super().__init__(num_classes)
        self.alpha, self.beta = check_weights(self.name, alpha, beta)

    def active(self, logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nce_per_sample(logp, target)

    def passive(self, logp_y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=1)
        return self.alpha * self.active(logp, target) + self.beta * self.passive(gather_target(logp, target))


@register("nce+rce")
class NCEandRCE(ActivePassive):
    def __init__(self, num_classes: int, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__(num_classes, alpha, beta)

    def passive(self, logp_y: torch.Tensor) -> torch.Tensor:
        return rce_per_sample(logp_y)


@register("nce+mae")
class NCEandMAE(ActivePassive):
    def __init__(self, num_classes: int, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__(num_classes, alpha, beta)

    def passive(self, logp_y: torch.Tensor) -> torch.Tensor:
        return reduced_mae_per_sample(logp_y)


@register("nfl+rce")
class NFLandRCE(ActivePassive):
    def __init__(self, num_classes: int, alpha: float = 1.0, beta: float = 1.0, gamma: float = 0.5) -> None:
        super().__init__(num_classes, alpha, beta)
        self.gamma = check_real(self.name, "gamma", gamma, ge=0)

    def active(self, logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nfl_per_sample(logp, target, self.gamma)

    def passive(self, logp_y: torch.Tensor) -> torch.Tensor:
        return rce_per_sample(logp_y)


@register("nce+agce")
class NCEandAGCE(ActivePassive):
    def __init__(self, num_classes: int, alpha: float = 1.0, beta: float = 4.0, a: float = 6.0, q: float = 1.5) -> None:
        super().__init__(num_classes, alpha, beta)
        self.a = check_real(self.name, "a", a, gt=0)
        self.q = check_real(self.name, "q", q, gt=0)

    def passive(self, logp_y: torch.Tensor) -> torch.Tensor:
        return agce_per_sample(logp_y.exp(), self.a, self.q)


@register("nce+aul")
class NCEandAUL(ActivePassive):
    def __init__(self, num_classes: int, alpha: float = 1.0, beta: float = 4.0, a: float = 6.3, q: float = 1.5) -> None:
        super().__init__(num_classes, alpha, beta)
        self.a = check_real(self.name, "a", a, gt=1)
        self.q = check_real(self.name, "q", q, gt=0)

    def passive(self, logp_y: torch.Tensor) -> torch.Tensor:
        return aul_per_sample(logp_y.exp(), self.a, self.q)


@register("nce+ael")
class NCEandAEL(ActivePassive):
    def __init__(self, num_classes: int, alpha: float = 1.0, beta: float = 4.0, a: float = 5.0) -> None:
        super().__init__(num_classes, alpha, beta)
        self.a = check_real(self.name, "a", a, gt=0)

    def passive(self, logp_y: torch.Tensor) -> torch.Tensor:
        return ael_per_sample(logp_y.exp(), self.a)
