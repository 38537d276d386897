"""Long-tail baselines driven by the per-class training counts n_c.

ldam: label-distribution-aware margin (Cao, Wei, Gaidon, Arechiga & Ma, NeurIPS 2019, "Learning
      Imbalanced Datasets with Label-Distribution-Aware Margin Loss"):
      m_c = K / n_c^(1/4) with K chosen so that max_c m_c = max_margin;
      L = CE(s * (z - m_y e_y), y). Defaults max_margin=0.5, s=30 as in the authors' code.
      (Their deferred re-weighting schedule, DRW, is a sampler/weight choice and is not part of this loss.)
logit_adjusted: logit-adjusted softmax cross entropy (Menon, Jayasumana, Rawat, Jain, Veit & Kumar,
      ICLR 2021, "Long-tail Learning via Logit Adjustment"): L = CE(z + tau * log pi, y),
      pi_c = n_c / sum_k n_k; tau = 1 by default. Only training uses the adjustment; predict with z.
balanced_softmax: the same training loss with tau = 1 (Ren et al., NeurIPS 2020, "Balanced
      Meta-Softmax"), registered under its own name for configs that use it.

    .venv/bin/python -c "import torch; from dynloss.losses import build_loss; \
l = build_loss('ldam', 3, class_counts=[500, 50, 5]); print(l.margins, l(torch.randn(4, 3), torch.tensor([0, 1, 2, 2])))"
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import RobustLoss, check_class_counts, check_real, register


@register("ldam")
class LDAMLoss(RobustLoss):
    """CE on s * (z - m_y e_y) with class margins m_c proportional to n_c^(-1/4) (Cao et al. 2019)."""

    def __init__(
        self, num_classes: int, class_counts: Sequence[float] | None = None, max_margin: float = 0.5, s: float = 30.0
    ) -> None:
        super().__init__(num_classes)
        self.class_counts = check_class_counts(self.name, class_counts, self.num_classes)
        self.max_margin = check_real(self.name, "max_margin", max_margin, gt=0)
        self.s = check_real(self.name, "s", s, gt=0)
        m = torch.tensor(self.class_counts, dtype=torch.float64) ** -0.25
        self.register_buffer("margins", (m * (self.max_margin / m.max())).float(), persistent=False)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        margins = self.margins.to(device=logits.device, dtype=logits.dtype)
        shifted = logits - F.one_hot(target, self.num_classes).to(logits.dtype) * margins[target].unsqueeze(1)
        return F.cross_entropy(self.s * shifted, target, reduction="none")


@register("logit_adjusted")
class LogitAdjustedLoss(RobustLoss):
    """CE(z + tau * log prior, y) (Menon et al. 2021)."""

    def __init__(self, num_classes: int, class_counts: Sequence[float] | None = None, tau: float = 1.0) -> None:
        super().__init__(num_classes)
        self.class_counts = check_class_counts(self.name, class_counts, self.num_classes)
        self.tau = check_real(self.name, "tau", tau, gt=0)
        counts = torch.tensor(self.class_counts, dtype=torch.float64)
        log_prior = torch.log(counts / counts.sum())
        self.register_buffer("adjustment", (self.tau * log_prior).float(), persistent=False)

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        adjusted = logits + self.adjustment.to(device=logits.device, dtype=logits.dtype)
        return F.cross_entropy(adjusted, target, reduction="none")


@register("balanced_softmax")
class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax = the logit-adjusted training loss with tau = 1 (Ren et al. 2020)."""

    def __init__(self, num_classes: int, class_counts: Sequence[float] | None = None) -> None:
        super().__init__(num_classes, class_counts=class_counts, tau=1.0)
