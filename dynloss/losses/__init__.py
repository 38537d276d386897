"""The robust-loss family, selectable by name (DESIGN.md section 4).

from dynloss.losses import build_loss, LOSSES, PRESETS
loss = build_loss("nce+agce", num_classes=10, preset="cifar10")   # or alpha=1, beta=4, a=6, q=1.5
loss(logits, target)                  # scalar batch mean (float32)
loss.set_epoch(epoch, total_epochs)   # schedule-dependent losses (dal, sr); a no-op elsewhere

.venv/bin/python -c "from dynloss.losses import LOSSES; print(sorted(LOSSES))"
"""

from . import active_passive, asymmetric, ce, dal, gce, long_tail, normalized, sparse, symmetric  # noqa: F401  (registers)
from .base import LOSSES, RobustLoss, register
from .build import build_loss, needs_class_counts
from .presets import PRESETS

__all__ = ["LOSSES", "PRESETS", "RobustLoss", "build_loss", "needs_class_counts", "register"]
