"""The model registry: name -> builder ``(num_classes, in_chans, pretrained) -> Classifier``.

    python -c "from dynloss.models import MODELS; print(sorted(MODELS))"
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[[int, int, bool], nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder to MODELS under ``name`` (a second registration of a name is an error)."""
    def add(builder: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder
    return add


def build_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False):
    """A fresh ``Classifier`` by registry name. Raises ValueError for an unknown name or bad sizes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if int(in_chans) < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    return MODELS[name](int(num_classes), int(in_chans), bool(pretrained))
