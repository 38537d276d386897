"""Per-iteration learning-rate schedules: cosine with linear warm-up, step, one-cycle.

Sources: the Dynamic Loss authors' CIFAR recipe (DESIGN.md section 3: cosine with a 5-epoch linear warm-up),
step decay at milestone epochs (the usual Animal-10N / WebVision recipes) and Smith & Topin 2019 (one-cycle,
torch's OneCycleLR, used by DESIGN.md section 8's Fashion-MNIST calibration). All three step once per
training iteration, so a schedule is the same whatever the number of workers; ``total_steps`` is an upper
bound of the iterations (Ray Data's equal split can drop a few rows), and stepping past it holds the last lr.

    python -c "import torch; from dynloss.schedules import build_scheduler; \
o = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1); \
s = build_scheduler(o, 'cosine', steps_per_epoch=10, epochs=5, warmup_epochs=1); print(s.get_last_lr())"
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

SCHEDULES = ("cosine", "step", "onecycle")


class _HeldOneCycle(OneCycleLR):
    """OneCycleLR that holds its final lr instead of raising when stepped past total_steps."""

    def step(self, epoch=None):
        if self.last_epoch + 1 >= self.total_steps:
            return
        super().step(epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, steps_per_epoch: int, epochs: int,
                    warmup_epochs: float = 0.0, milestones: Sequence[int] = (), gamma: float = 0.1) -> LRScheduler:
    """A scheduler to ``.step()`` after every iteration; the optimizer's lr is the peak/base lr."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    steps_per_epoch = max(1, int(steps_per_epoch))
    total = max(1, steps_per_epoch * int(epochs))
    warm = round(warmup_epochs * steps_per_epoch)
    if schedule == "onecycle":
        lrs = [g["lr"] for g in optimizer.param_groups]
        # the momentum stays as configured (torch's default would cycle it between 0.85 and 0.95)
        return _HeldOneCycle(optimizer, max_lr=lrs, total_steps=total, cycle_momentum=False)
    bounds = [m * steps_per_epoch for m in sorted(milestones)]

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        if schedule == "step":
            return gamma ** sum(it >= b for b in bounds)
        progress = min(1.0, (it - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def fast_forward(scheduler: LRScheduler, iterations: int) -> None:
    """Put a freshly built scheduler at ``iterations`` steps done (a run resumed with a new length: its lr
    continues on the new schedule instead of the one it was saved with)."""
    import warnings

    scheduler.last_epoch = int(iterations) - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
