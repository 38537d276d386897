"""Loss-rank buckets and hierarchical metadata sampling of Dynamic Loss.

Source: Jiang et al., "Dynamic Loss For Robust Learning" (TPAMI 2023), sections 3.2-3.3, and the authors'
code as described in DESIGN.md section 3:

* ``loss_ranks``: the label corrector's input. Group by given label, sort ascending by loss; the j-th
  (0-based) sample of a class of n_c gets bucket ``floor(j / (n_c + 1) * R)``. Computed in integer
  arithmetic, ``(j * R) // (n_c + 1)``, which is that floor exactly; ties in loss keep sample order.
* ``hierarchical_sample``: the per-epoch meta set. n_min = size of the smallest class present; level 1 draws
  ``max(1, round(ratio1 * n_min))`` samples per class at random (diversity); level 2 keeps
  ``max(1, round(ratio2 * level1))`` of them by loss: ``easy`` (lowest loss, likely clean: the released
  code), ``hard`` (highest), ``mixed`` (half each) or ``random``. Rounding is half up, so CIFAR-10 with
  rho = 0.01 (n_min = 50) gives 25 and then 13 per class. ``per_class`` replaces the level-1 size;
  ``clean_ids`` (a trusted clean set, the paper's "unbiased metadata") are always in and count toward each
  class's quota, the hierarchy only fills the rest from the other samples of that class.
* ``clean_seed``: such a trusted set drawn from the training data itself, up to N rows per class whose given
  label is known to be right (synthetic noise keeps the true label): what a user who verified N labels per
  class would hold (``sampling.clean_per_class``; ``sampling.clean_meta`` is a separately prepared one).
* ``agreeing_pool`` (ours, opt-in ``sampling.meta_pool: agreeing``): the rows the hierarchy may draw from, only
  those whose label the classifier predicts, topped up per class; for labels made mostly of flips.

    python -c "import numpy as np; from dynloss.sampling import *; y = np.repeat(np.arange(10), [5000]*9 + [50]); \
l = np.random.rand(y.size); print(np.bincount(y[hierarchical_sample(y, l)]))"
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

CRITERIA = ("easy", "hard", "mixed", "random")


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def loss_ranks(labels, losses, num_buckets: int = 100, num_classes: int | None = None):
    """Per-sample loss-rank bucket in [0, num_buckets) within its given class.

    Accepts numpy arrays or torch tensors and returns the same kind (int64; a tensor stays on its device).
    One stable sort by loss then one stable sort by label: no Python loop. With ``num_classes`` given the
    torch path makes no host sync (``bincount`` has to read the largest label first).
    """
    num_buckets = int(num_buckets)
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if isinstance(labels, torch.Tensor) or isinstance(losses, torch.Tensor):
        device = labels.device if isinstance(labels, torch.Tensor) else losses.device
        y = torch.as_tensor(labels, device=device).long().reshape(-1)
        loss = torch.as_tensor(losses, device=device).reshape(-1)
        _check_lengths(y.shape[0], loss.shape[0])
        if y.numel() == 0:
            return y.clone()
        by_loss = torch.sort(loss, stable=True).indices
        order = by_loss[torch.sort(y[by_loss], stable=True).indices]
        if num_classes is None:
            counts = torch.bincount(y)
        else:
            counts = torch.zeros(int(num_classes), dtype=torch.long, device=device).index_add_(
                0, y, torch.ones_like(y))
        starts = torch.cumsum(counts, 0) - counts
        ys = y[order]
        j = torch.arange(y.numel(), device=device) - starts[ys]
        ranks = torch.empty_like(y)
        ranks[order] = (j * num_buckets) // (counts[ys] + 1)
        return ranks
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    loss = np.asarray(losses).reshape(-1)
    _check_lengths(y.size, loss.size)
    if y.size == 0:
        return y.copy()
    if y.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(y.min())}")
    order = np.lexsort((loss, y))  # by label, then loss; stable
    counts = np.bincount(y, minlength=num_classes or 0)
    starts = np.cumsum(counts) - counts
    ys = y[order]
    j = np.arange(y.size) - starts[ys]
    ranks = np.empty_like(y)
    ranks[order] = (j * num_buckets) // (counts[ys] + 1)
    return ranks


def _check_lengths(n_labels: int, n_losses: int) -> None:
    if n_labels != n_losses:
        raise ValueError(f"labels and losses must have the same length, got {n_labels} and {n_losses}")


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# Level-2 selectors: (candidate indices, their losses, k, rng) -> k of the candidates.
def _easy(cand, loss, k, rng):
    return cand[np.argsort(loss, kind="stable")[:k]]


def _hard(cand, loss, k, rng):
    return cand[np.argsort(-loss, kind="stable")[:k]]


def _mixed(cand, loss, k, rng):
    order = np.argsort(loss, kind="stable")
    n_easy = (k + 1) // 2  # the odd one goes to the easy side
    return cand[np.concatenate([order[:n_easy], order[len(order) - (k - n_easy):]])]


def _random(cand, loss, k, rng):
    return rng.choice(cand, size=k, replace=False)


SELECTORS: dict[str, Callable[..., np.ndarray]] = {"easy": _easy, "hard": _hard, "mixed": _mixed, "random": _random}


def meta_set_sizes(labels, ratio1: float = 0.5, ratio2: float = 0.5, per_class: int | None = None
                   ) -> tuple[int, int]:
    """(level-1, level-2) per-class sizes that ``hierarchical_sample`` uses for these labels (before capping)."""
    _check_ratio("ratio1", ratio1)
    _check_ratio("ratio2", ratio2)
    counts = np.bincount(_to_numpy(labels).astype(np.int64).reshape(-1))
    present = counts[counts > 0]
    if present.size == 0:
        raise ValueError("labels is empty: no meta set to sample")
    if per_class is not None:
        if int(per_class) < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        k1 = int(per_class)
    else:
        k1 = max(1, _round_half_up(ratio1 * int(present.min())))
    return k1, max(1, _round_half_up(ratio2 * k1))


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def hierarchical_sample(labels, losses, ratio1: float = 0.5, ratio2: float = 0.5, criterion: str = "easy",
                        per_class: int | None = None, clean_ids=None, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of a class-balanced meta set (see the module docstring).

    ``losses`` may be None only with ``criterion="random"``. ``clean_ids`` index into ``labels`` (their labels
    there are taken as correct). Each class gets ``max(1, round(ratio2 * level1))`` samples, fewer only if it
    is smaller than that, more only if it has more clean samples than that (all clean samples are kept).
    """
    if criterion not in SELECTORS:
        raise ValueError(f"unknown sampling criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(y.min())}")
    if losses is None:
        if criterion != "random":
            raise ValueError(f"criterion {criterion!r} needs losses; pass them or use criterion='random'")
        loss = np.zeros(y.size)
    else:
        loss = _to_numpy(losses).astype(np.float64).reshape(-1)
        _check_lengths(y.size, loss.size)
    k1, k2 = meta_set_sizes(y, ratio1, ratio2, per_class)

    is_clean = np.zeros(y.size, dtype=bool)
    if clean_ids is not None:
        ids = _to_numpy(clean_ids).astype(np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= y.size):
            raise ValueError(f"clean_ids must index into labels (0..{y.size - 1}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        is_clean[ids] = True

    rng = np.random.default_rng(seed)
    select = SELECTORS[criterion]
    chosen = [np.flatnonzero(is_clean)]
    # one sort groups the classes (a per-class `y == c` scan is O(N*C): minutes for WebVision's 1000 classes)
    order = np.argsort(y, kind="stable")
    bounds = np.cumsum(np.bincount(y))
    for c in np.flatnonzero(np.bincount(y)):
        members = order[bounds[c - 1] if c else 0:bounds[c]]
        clean_here = is_clean[members]
        need = k2 - int(clean_here.sum())
        pool = members[~clean_here]
        if need <= 0 or pool.size == 0:
            continue
        # the clean samples already fill part of the quota; the hierarchy keeps its ratio on the rest
        level1 = rng.choice(pool, size=min(pool.size, max(need, _round_half_up(k1 * need / k2))), replace=False)
        chosen.append(select(level1, loss[level1], min(need, level1.size), rng))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def clean_seed(labels, true_labels, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of up to ``per_class`` rows per class with ``labels == true_labels`` (a right label),
    drawn at random with ``seed``; the same rows for the same inputs, whatever the epoch."""
    y, t = _to_numpy(labels).astype(np.int64).reshape(-1), _to_numpy(true_labels).astype(np.int64).reshape(-1)
    _check_lengths(y.size, t.size)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    right = np.flatnonzero((y == t) & (t >= 0))
    rng = np.random.default_rng(seed)
    right = right[rng.permutation(right.size)]
    # the first per_class of each class in that random order (a stable sort keeps it within a class)
    by_class = right[np.argsort(y[right], kind="stable")]
    return np.sort(by_class[_position_in_class(y[by_class]) < per_class]).astype(np.int64)


def _position_in_class(sorted_labels: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal labels of an array sorted by label."""
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.arange(sorted_labels.size) - starts


def flipped_labels(labels, preds, num_classes: int, ratio: float) -> tuple[list[int], float]:
    """Labels whose rows the classifier predicts as one other class more than ``1 / ratio`` times as often as
    the label itself, and the smallest such ratio over all labels (own / most-predicted other; inf if none).

    After the warm-up this separates class-dependent noise from symmetric noise: where a head class is flipped
    into a neighbour, the classifier learns the flips, and either the flipped-into label's rows or the source
    class's own rows go to the other class almost entirely (Fashion-MNIST-LT, asymmetric 0.4: smallest ratio
    0.006-0.040 over seeds 0-2 on the CPU, 0.000-0.135 over seeds 0-4 on a GPU); under symmetric noise the other
    classes share a label's wrong rows and the smallest ratio was 0.235-3.3 (noise 0.4, imbalance 0.01 and 0.1;
    docs/method.md section 4). Milder class-dependent noise (asymmetric 0.2, or imbalance 0.1) gave 0.04-0.82: the
    check fired on one seed of three.
    """
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    p = _to_numpy(preds).astype(np.int64).reshape(-1)
    _check_lengths(y.size, p.size)
    counts = np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    own = np.diag(counts).astype(np.float64)
    other = np.where(np.eye(num_classes, dtype=bool), -1, counts).max(1).astype(np.float64)
    share = np.where(other > 0, own / np.maximum(other, 1), np.inf)  # inf: no row of it predicted as another class
    return [int(k) for k in np.flatnonzero(share < ratio)], float(share.min(initial=np.inf))


def agreeing_pool(labels, agree, losses, k: int) -> np.ndarray:
    """Sorted int64 indices of the rows the meta set may come from under ``sampling.meta_pool: agreeing``: every
    row whose given label the classifier agrees with (``agree``), and for a class with fewer than ``k`` such rows
    its easiest (lowest-loss) other rows up to ``k``, so no class drops out of the metadata.

    A label mostly flipped in from another class (asymmetric noise under a long tail) fills its "easy" metadata
    with the flips; the rows the classifier agrees with are the right ones there (docs/method.md section 4).
    """
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    ok = _to_numpy(agree).astype(bool).reshape(-1)
    loss = _to_numpy(losses).astype(np.float64).reshape(-1)
    _check_lengths(y.size, loss.size)
    _check_lengths(y.size, ok.size)
    n_agree = np.bincount(y[ok], minlength=int(y.max(initial=-1)) + 1)
    need = np.minimum(np.maximum(0, k - n_agree), np.bincount(y[~ok], minlength=len(n_agree)))
    others = np.flatnonzero(~ok)
    others = others[np.lexsort((loss[others], y[others]))]  # by label, then loss
    take = _position_in_class(y[others]) < need[y[others]]
    return np.sort(np.concatenate([np.flatnonzero(ok), others[take]])).astype(np.int64)
