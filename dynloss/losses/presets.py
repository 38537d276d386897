"""Per-dataset loss parameters published by the loss authors: PRESETS[dataset][loss name] = params.

Sources (the released code of each paper):
  APL  (Ma et al., ICML 2020)       github.com/HanxunH/Active-Passive-Losses configs/{cifar10,cifar100}/sym/*.yaml:
       sce, nce+rce, nce+mae, nfl+rce, focal/nfl gamma=0.5
  SCE  (Wang et al., ICCV 2019)     CIFAR-10 alpha=0.1 beta=1.0; CIFAR-100 alpha=6.0 beta=0.1 (same in the APL configs)
  GCE  (Zhang & Sabuncu, NeurIPS 2018)  q=0.7
  ALF  (Zhou et al., ICML 2021)     github.com/hitcszx/ALFs config.py CIFAR10_CONFIG / CIFAR100_CONFIG:
       agce, aul, ael, nce+agce, nce+aul, nce+ael (CIFAR-100 agce/aul/ael are the same values as CIFAR-10 there)
  SR   (Zhou et al., ICCV 2021)     github.com/hitcszx/lnl_sr config.py CE+SR (tau, p, lam, rho); CIFAR-100 lam=10
       (main.py, symmetric noise; 4 for asymmetric). WebVision: the DAL authors' webvision.py defaults.
  DAL  (Li et al., PR 2023)         github.com/XiuchuanLi/DAL cifar.py (q_start=0.6, q_end=1.5) and webvision.py
       (mini-WebVision: q_start=0.4, q_end=1.5).
ldam / logit_adjusted need the training class counts and so have no presets.

    .venv/bin/python -c "from dynloss.losses import PRESETS; print(PRESETS['cifar10']['nce+agce'])"
"""

from __future__ import annotations

from typing import Any

_CIFAR10: dict[str, dict[str, Any]] = {
    "ce": {},
    "focal": {"gamma": 0.5},
    "gce": {"q": 0.7},
    "sce": {"alpha": 0.1, "beta": 1.0},
    "nce": {},
    "rce": {},
    "mae": {},
    "nfl": {"gamma": 0.5},
    "nce+rce": {"alpha": 1.0, "beta": 1.0},
    "nce+mae": {"alpha": 1.0, "beta": 1.0},
    "nfl+rce": {"alpha": 1.0, "beta": 1.0, "gamma": 0.5},
    "agce": {"a": 0.6, "q": 0.6},
    "aul": {"a": 5.5, "q": 3.0},
    "ael": {"a": 2.5},
    "nce+agce": {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5},
    "nce+aul": {"alpha": 1.0, "beta": 4.0, "a": 6.3, "q": 1.5},
    "nce+ael": {"alpha": 1.0, "beta": 4.0, "a": 5.0},
    "dal": {"q_start": 0.6, "q_end": 1.5},
    "sr": {"base": "ce", "tau": 0.5, "p": 0.1, "lam": 1.2, "rho": 1.03},
}

_CIFAR100: dict[str, dict[str, Any]] = {
    "ce": {},
    "focal": {"gamma": 0.5},
    "gce": {"q": 0.7},
    "sce": {"alpha": 6.0, "beta": 0.1},
    "nce": {},
    "rce": {},
    "mae": {},
    "nfl": {"gamma": 0.5},
    "nce+rce": {"alpha": 10.0, "beta": 0.1},
    "nce+mae": {"alpha": 10.0, "beta": 1.0},
    "nfl+rce": {"alpha": 10.0, "beta": 0.1, "gamma": 0.5},
    "agce": {"a": 0.6, "q": 0.6},
    "aul": {"a": 5.5, "q": 3.0},
    "ael": {"a": 2.5},
    "nce+agce": {"alpha": 10.0, "beta": 0.1, "a": 1.8, "q": 3.0},
    "nce+aul": {"alpha": 10.0, "beta": 0.015, "a": 6.0, "q": 3.0},
    "nce+ael": {"alpha": 10.0, "beta": 0.1, "a": 1.5},
    "dal": {"q_start": 0.6, "q_end": 1.5},
    "sr": {"base": "ce", "tau": 0.5, "p": 0.01, "lam": 10.0, "rho": 1.02},
}

_WEBVISION: dict[str, dict[str, Any]] = {
    "ce": {},
    "dal": {"q_start": 0.4, "q_end": 1.5},
    "sr": {"base": "ce", "tau": 0.5, "p": 0.01, "lam": 2.0, "rho": 1.02},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cifar10": _CIFAR10,
    "cifar100": _CIFAR100,
    # The DAL authors ran mini-WebVision (first 50 classes); the same values serve both names.
    "webvision": _WEBVISION,
    "webvision-mini": _WEBVISION,
}


def preset_params(dataset: str, name: str) -> dict[str, Any]:
    """A copy of PRESETS[dataset][name]; ValueError naming the valid datasets / losses otherwise."""
    key = dataset.lower() if isinstance(dataset, str) else dataset
    if key not in PRESETS:
        raise ValueError(f"unknown preset {dataset!r}; valid presets: {', '.join(PRESETS)}")
    table = PRESETS[key]
    if name not in table:
        raise ValueError(
            f"preset {key!r} has no parameters for loss {name!r}; it covers: {', '.join(table)}. "
            "Pass the parameters explicitly instead of preset="
        )
    return dict(table[name])
