"""`build_loss(name, num_classes, preset=None, **params)`: the one entry point configs use.

Parameters resolve as: the class defaults, then PRESETS[preset][name] if a preset is named, then the
explicit keyword arguments (which win). Unknown names, unknown parameter names and out-of-range
values raise ValueError naming what is wrong and what is accepted.

    .venv/bin/python -c "from dynloss.losses import build_loss; \
print(build_loss('nce+agce', 10, preset='cifar10', beta=2))"
"""

from __future__ import annotations

import inspect
from typing import Any

from .base import LOSSES, RobustLoss, instantiate
from .presets import preset_params


def build_loss(name: str, num_classes: int, preset: str | None = None, **params: Any) -> RobustLoss:
    """Build the registered loss `name` for `num_classes` classes (see module docstring)."""
    resolved: dict[str, Any] = {}
    # A misspelt name must report the valid loss names, not a missing preset entry.
    if preset is not None and name in LOSSES:
        resolved.update(preset_params(preset, name))
    resolved.update(params)
    return instantiate(name, num_classes, resolved)


def needs_class_counts(name: str) -> bool:
    """Whether loss ``name`` takes the training set's per-class counts (ldam, logit_adjusted, ...)."""
    return name in LOSSES and "class_counts" in inspect.signature(LOSSES[name]).parameters
