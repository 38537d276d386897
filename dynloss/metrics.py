"""Evaluation metrics: top-k, per-class and many/medium/few-shot accuracy, and label-correction quality.

Sources: top-k as in torchvision ``references/classification/utils.accuracy``; the shot split of Liu et al.
2019 (OLTR, ImageNet-LT): many-shot classes have > 100 training images, few-shot < 20, medium the rest,
each group's accuracy the mean of its classes' accuracies; ROC AUC as the Mann-Whitney statistic on
average ranks (ties count one half).

All functions accept numpy arrays or torch tensors (any device) and return Python floats / numpy arrays;
accuracies are fractions in [0, 1].

    python -c "import numpy as np; from dynloss.metrics import *; print(correction_metrics( \
np.array([.9, .2, .8, .1]), np.array([0, 1, 2, 3]), np.array([0, 0, 2, 1])))"
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(x, name: str) -> np.ndarray:
    """Class indices; a 2-D input (logits / probabilities) is reduced by argmax."""
    arr = _np(x)
    if arr.ndim == 2:
        arr = arr.argmax(axis=1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be class indices (N,) or scores (N, C), got shape {arr.shape}")
    return arr.astype(np.int64)


def _same_length(**arrays) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")


def topk_accuracy(logits, targets, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of samples whose target is among the k highest scores}; k is capped at the class count."""
    scores = torch.as_tensor(logits) if not isinstance(logits, torch.Tensor) else logits.detach()
    target = torch.as_tensor(_np(targets) if not isinstance(targets, torch.Tensor) else targets,
                             device=scores.device).long().reshape(-1)
    if scores.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(scores.shape)}")
    _same_length(logits=scores, targets=target)
    if target.numel() == 0:
        return {int(k): math.nan for k in ks}
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == target[:, None]
    return {int(k): hit[:, :min(int(k), kmax)].any(dim=1).float().mean().item() for k in ks}


def per_class_accuracy(preds, targets, num_classes: int) -> np.ndarray:
    """(num_classes,) accuracy of each true class; nan for a class absent from ``targets``."""
    p, t = _labels(preds, "preds"), _labels(targets, "targets")
    _same_length(preds=p, targets=t)
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"targets must be in [0, {num_classes}), found [{t.min()}, {t.max()}]")
    total = np.bincount(t, minlength=num_classes).astype(np.float64)
    correct = np.bincount(t[p == t], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def shot_split_accuracy(preds, targets, train_counts, many: int = 100, few: int = 20) -> dict[str, float]:
    """{"many", "medium", "few"}: mean per-class accuracy of the classes with > ``many``, between, and
    < ``few`` training samples (ImageNet-LT cut-offs by default; smaller datasets need their own).
    Only classes present in ``targets`` count; an empty group gives nan."""
    counts = _np(train_counts).astype(np.int64).reshape(-1)
    if few > many:
        raise ValueError(f"few ({few}) must be <= many ({many})")
    acc = per_class_accuracy(preds, targets, len(counts))
    groups = {"many": counts > many, "medium": (counts <= many) & (counts >= few), "few": counts < few}
    out = {}
    for name, mask in groups.items():
        vals = acc[mask & ~np.isnan(acc)]
        out[name] = float(vals.mean()) if vals.size else math.nan
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each tie group
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def roc_auc(scores, positive) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive``: P(score_pos > score_neg) + P(tie) / 2.
    nan when either class is empty."""
    s, pos = _np(scores).astype(np.float64).reshape(-1), _np(positive).astype(bool).reshape(-1)
    _same_length(scores=s, positive=pos)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def correction_metrics(trust, given, true, threshold: float = 0.5) -> dict[str, float]:
    """How well the corrector's trust finds the wrong labels (synthetic noise, true labels known).

    noisy = ``given != true``; flagged = ``trust < threshold``. Returns ``precision`` and ``recall`` of
    flagging the noisy samples, ``auc`` (ROC AUC of ``1 - trust`` for noisy), ``trust_clean`` and
    ``trust_noisy`` (mean trust of each group), ``noise_rate`` and ``flagged_rate``. Samples whose true label
    is -1 (unknown) are left out; an undefined value is nan.
    """
    w = _np(trust).astype(np.float64).reshape(-1)
    g, t = _labels(given, "given"), _labels(true, "true")
    _same_length(trust=w, given=g, true=t)
    known = t >= 0
    w, g, t = w[known], g[known], t[known]
    noisy = g != t
    flagged = w < threshold
    n_flag, n_noisy, hits = int(flagged.sum()), int(noisy.sum()), int((flagged & noisy).sum())

    def mean(x):
        return float(x.mean()) if x.size else math.nan

    return {
        "precision": hits / n_flag if n_flag else math.nan,
        "recall": hits / n_noisy if n_noisy else math.nan,
        "auc": roc_auc(1.0 - w, noisy),
        "trust_clean": mean(w[~noisy]),
        "trust_noisy": mean(w[noisy]),
        "noise_rate": mean(noisy.astype(np.float64)),
        "flagged_rate": mean(flagged.astype(np.float64)),
    }


IMAGENET_LT_SHOTS = (100, 20)


def shot_thresholds(train_counts: Sequence[int]) -> tuple[int, int]:
    """(many, few): ImageNet-LT's (100, 20) when all three groups are non-empty, else thirds by count."""
    counts = np.sort(np.asarray(train_counts, dtype=np.int64))
    many, few = IMAGENET_LT_SHOTS
    if (counts > many).any() and (counts < few).any() and ((counts <= many) & (counts >= few)).any():
        return many, few
    k = len(counts) // 3
    if k == 0 or counts[0] == counts[-1]:
        return int(counts[-1]), int(counts[0])  # balanced or tiny: every class is medium-shot
    # few = the k smallest classes (count < counts[k]); many = the k largest (count > counts[-k-1])
    return int(counts[-k - 1]), int(counts[k])


def eval_metrics(pred: np.ndarray, label: np.ndarray, top5_hit: np.ndarray, train_counts: Sequence[int],
                 thresholds: Sequence[int] | None = None) -> tuple[dict[str, float], np.ndarray]:
    """(``eval/*`` metrics, per-class accuracy) of predictions on a clean split."""
    num_classes = len(train_counts)
    many, few = thresholds or shot_thresholds(train_counts)
    per_class = per_class_accuracy(pred, label, num_classes)
    shots = shot_split_accuracy(pred, label, train_counts, many=many, few=few)
    present = per_class[~np.isnan(per_class)]
    metrics = {
        "eval/top1": float(np.mean(pred == label)) if len(label) else float("nan"),
        "eval/top5": float(np.mean(top5_hit)) if len(label) else float("nan"),
        "eval/many_shot": shots["many"],
        "eval/medium_shot": shots["medium"],
        "eval/few_shot": shots["few"],
        "eval/mean_class": float(present.mean()) if present.size else float("nan"),
        "eval/worst_class": float(present.min()) if present.size else float("nan"),
        "eval/images": float(len(label)),
    }
    return metrics, per_class


def prediction_arrays(out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """From ``dynloss.engine.predict`` output: pred, label, top5_hit (1-D, so workers can gather them)."""
    top5 = np.asarray(out["top5"]).reshape(len(out["label"]), -1)
    return {"pred": out["pred"], "label": out["label"], "top5_hit": (top5 == out["label"][:, None]).any(1)}
