"""Registry, base class and parameter checks shared by the robust-loss family.

Every loss is a `RobustLoss` subclass registered by name with `@register("name")`; `build_loss`
(in `dynloss.losses.registry`) looks the name up in `LOSSES`, merges a per-dataset preset and
validates the parameter names against the class signature. A subclass implements
`compute(logits, target) -> (B,)` on float32 logits; the base class handles dtype (autocast,
float16/bfloat16 inputs are computed in float32), shape checks, the batch mean, and the
`set_epoch(epoch, total_epochs)` hook that schedule-dependent losses (dal, sr) override.

    .venv/bin/python -c "from dynloss.losses import LOSSES; print(sorted(LOSSES))"
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

LOSSES: dict[str, type[RobustLoss]] = {}

# Floor for 1 - p before a fractional power: (1-p)^gamma has an infinite derivative at p = 1
# (reached exactly in float32 once a logit gap exceeds ~17), which would give inf * 0 = NaN.
ONE_MINUS_P_FLOOR = 1e-12

_T = TypeVar("_T", bound=type)


def register(name: str) -> Callable[[_T], _T]:
    """Class decorator: add a `RobustLoss` subclass to `LOSSES` under `name`."""

    def deco(cls: _T) -> _T:
        if name in LOSSES:
            raise ValueError(f"loss name {name!r} is registered twice ({LOSSES[name].__name__} and {cls.__name__})")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return deco


def _autocast_off(device_type: str):
    # Robust losses raise p to fractional powers and divide by sums of logs: half precision
    # loses them, so the whole computation runs in float32 even inside an autocast region.
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class RobustLoss(nn.Module):
    """Base class: `forward(logits (B, C), target (B,) int64) -> scalar batch mean (float32)`."""

    name: str = ""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(
                f"{self.name or type(self).__name__}: num_classes must be an integer >= 2 (got {num_classes!r})"
            )
        self.num_classes = int(num_classes)
        self.epoch = 0
        self.total_epochs: int | None = None

    # -- schedule ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Tell the loss where training is (0-based `epoch` of `total_epochs`); a no-op here."""
        for key, value, low in (("epoch", epoch, 0), ("total_epochs", total_epochs, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{self.name}.set_epoch: {key} must be an integer >= {low} (got {value!r})")
        if epoch > total_epochs:
            raise ValueError(f"{self.name}.set_epoch: epoch must be in [0, total_epochs={total_epochs}] (got {epoch})")
        self.epoch, self.total_epochs = int(epoch), int(total_epochs)

    # -- evaluation -------------------------------------------------------------------------
    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,) from float32 logits (B, C) and int64 targets (B,)."""
        raise NotImplementedError

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (B,) in float32, before the batch mean."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{self.name}: logits must have shape (batch, {self.num_classes}) (got {tuple(logits.shape)})"
            )
        if target.dim() != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{self.name}: target must have shape ({logits.shape[0]},) matching the logits (got {tuple(target.shape)})"
            )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"{self.name}: target must hold integer class indices (got dtype {target.dtype})")
        with _autocast_off(logits.device.type):
            return self.compute(logits.float(), target.long())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, target).mean()

    # -- introspection ----------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """Keyword parameters `build_loss` accepts for this loss (everything but num_classes)."""
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p not in ("self", "num_classes")]

    def hparams(self) -> dict[str, Any]:
        """The resolved parameters, for logging and checkpoints."""
        return {p: getattr(self, p) for p in self.param_names()}

    def extra_repr(self) -> str:
        items = [f"num_classes={self.num_classes}"] + [f"{k}={v!r}" for k, v in self.hparams().items()]
        return ", ".join(items)


# -- shared tensor helpers --------------------------------------------------------------------
def gather_target(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x[i, target[i]] for a (B, C) tensor."""
    return x.gather(1, target.unsqueeze(1)).squeeze(1)


def one_minus_p(logp: torch.Tensor) -> torch.Tensor:
    """1 - p from log p, accurate near p = 1 (expm1), floored so fractional powers stay finite."""
    return (-torch.expm1(logp)).clamp_min(ONE_MINUS_P_FLOOR)


def target_log_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return gather_target(F.log_softmax(logits, dim=1), target)


# -- parameter checks -------------------------------------------------------------------------
def check_real(
    loss: str,
    param: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """Return `value` as a float if it is a finite real number inside the stated bounds, else ValueError."""
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if lt is not None:
        parts.append(f"< {lt:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    valid = " and ".join(parts) or "a finite real number"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt) and (le is None or v <= le)
    if not ok:
        raise ValueError(f"{loss}: parameter {param!r} must be a finite number {valid} (got {value!r})")
    return float(value)


def check_weights(loss: str, alpha: Any, beta: Any) -> tuple[float, float]:
    """alpha, beta >= 0 and not both zero (the active/passive and sce weights)."""
    a = check_real(loss, "alpha", alpha, ge=0)
    b = check_real(loss, "beta", beta, ge=0)
    if a == 0 and b == 0:
        raise ValueError(f"{loss}: parameters 'alpha' and 'beta' are both 0; at least one must be > 0")
    return a, b


def check_class_counts(loss: str, counts: Any, num_classes: int) -> tuple[float, ...]:
    """Per-class training counts: a 1-D sequence of num_classes finite numbers, all > 0."""
    if counts is None:
        raise ValueError(
            f"{loss}: parameter 'class_counts' is required (the number of training samples per class, "
            f"length num_classes={num_classes})"
        )
    try:
        t = torch.as_tensor(counts, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{loss}: parameter 'class_counts' must be a sequence of numbers (got {counts!r})") from exc
    if t.dim() != 1 or t.numel() != num_classes:
        raise ValueError(
            f"{loss}: parameter 'class_counts' must have one count per class, length num_classes={num_classes} "
            f"(got shape {tuple(t.shape)})"
        )
    bad = [i for i, c in enumerate(t.tolist()) if not (math.isfinite(c) and c > 0)]
    if bad:
        raise ValueError(
            f"{loss}: parameter 'class_counts' must be > 0 for every class (classes {bad[:10]} have "
            f"{[t[i].item() for i in bad[:10]]}); drop empty classes or pass counts with a floor of 1"
        )
    return tuple(t.tolist())


def instantiate(name: str, num_classes: int, params: dict[str, Any]) -> RobustLoss:
    """Build LOSSES[name](num_classes, **params), checking the name and the parameter names."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    accepted = cls.param_names()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or '(none)'}"
        )
    return cls(num_classes, **params)
