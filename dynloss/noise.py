"""Synthetic class imbalance and label noise: the benchmark protocols of the noisy long-tailed literature.

Sources:
  * long tail ``exp``: Cui et al. 2019 / Cao et al. 2019 (LDAM-DRW ``get_img_num_per_cls``),
    ``n_c = int(n_max * imbalance**(c / (C-1)))``; ``step``: LDAM, the first ``C // 2`` classes keep
    ``n_max``, the rest ``int(n_max * imbalance)``;
  * symmetric noise, ``prior`` convention: the Dynamic Loss code (DESIGN.md section 3), transition
    ``(1-r) I + r * prior``: a sample is resampled from the class prior with probability r, so it may land on
    its own class and the effective flip rate of class y is ``r * (1 - prior_y)``;
  * ``exact`` convention: Ma et al. 2020 (APL) / Zhou et al. 2021 (ALF): exactly ``round(r * n_c)`` samples
    of every class get a different label (uniform over the other classes for ``sym``);
  * asymmetric maps: Patrini et al. 2017 ("Making deep neural networks robust to label noise: a loss
    correction approach") for CIFAR-10, CIFAR-100 and MNIST; Fashion-MNIST is ours (see ASYM_MAPS).

Everything is deterministic given ``seed`` (one ``numpy.random.Generator`` per call).

    python -c "import numpy as np; from dynloss.noise import *; y = np.repeat(np.arange(10), 6000); \
keep = make_long_tailed(y, 0.01); z = add_label_noise(y[keep], 'sym', 0.4, 10); print(noise_summary(z, y[keep]))"
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

KINDS = ("none", "sym", "asym")
CONVENTIONS = ("prior", "exact")
PROFILES = ("exp", "step")

# The 20 CIFAR-100 superclasses (coarse labels, in their index order) as fine-label indices, sorted within
# each row. Within a superclass the asymmetric noise moves a class to the next one in its row, cyclically.
CIFAR100_SUPERCLASSES: tuple[tuple[int, ...], ...] = (
    (4, 30, 55, 72, 95),   # 0 aquatic mammals: beaver dolphin otter seal whale
    (1, 32, 67, 73, 91),   # 1 fish: aquarium_fish flatfish ray shark trout
    (54, 62, 70, 82, 92),  # 2 flowers: orchid poppy rose sunflower tulip
    (9, 10, 16, 28, 61),   # 3 food containers: bottle bowl can cup plate
    (0, 51, 53, 57, 83),   # 4 fruit and vegetables: apple mushroom orange pear sweet_pepper
    (22, 39, 40, 86, 87),  # 5 household electrical devices: clock keyboard lamp telephone television
    (5, 20, 25, 84, 94),   # 6 household furniture: bed chair couch table wardrobe
    (6, 7, 14, 18, 24),    # 7 insects: bee beetle butterfly caterpillar cockroach
    (3, 42, 43, 88, 97),   # 8 large carnivores: bear leopard lion tiger wolf
    (12, 17, 37, 68, 76),  # 9 large man-made outdoor things: bridge castle house road skyscraper
    (23, 33, 49, 60, 71),  # 10 large natural outdoor scenes: cloud forest mountain plain sea
    (15, 19, 21, 31, 38),  # 11 large omnivores and herbivores: camel cattle chimpanzee elephant kangaroo
    (34, 63, 64, 66, 75),  # 12 medium mammals: fox porcupine possum raccoon skunk
    (26, 45, 77, 79, 99),  # 13 non-insect invertebrates: crab lobster snail spider worm
    (2, 11, 35, 46, 98),   # 14 people: baby boy girl man woman
    (27, 29, 44, 78, 93),  # 15 reptiles: crocodile dinosaur lizard snake turtle
    (36, 50, 65, 74, 80),  # 16 small mammals: hamster mouse rabbit shrew squirrel
    (47, 52, 56, 59, 96),  # 17 trees: maple oak palm pine willow
    (8, 13, 48, 58, 90),   # 18 vehicles 1: bicycle bus motorcycle pickup_truck train
    (41, 69, 81, 85, 89),  # 19 vehicles 2: lawn_mower rocket streetcar tank tractor
)


def _cyclic_within(groups) -> dict[int, int]:
    return {g[i]: g[(i + 1) % len(g)] for g in groups for i in range(len(g))}


# source class -> class it is flipped to, for ``kind="asym"``. Classes not listed never flip.
ASYM_MAPS: dict[str, dict[int, int]] = {
    # truck->automobile, bird->airplane, deer->horse, cat<->dog (Patrini et al. 2017)
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    # next class within each true superclass, cyclic (Patrini et al. 2017, section 5)
    "cifar100": _cyclic_within(CIFAR100_SUPERCLASSES),
    # What the released code of Patrini / APL / ALF actually does: "superclasses" taken as consecutive blocks
    # of 5 fine indices (0-4, 5-9, ...), which are not the real superclasses. Use it to reproduce their numbers.
    "cifar100-blocks": _cyclic_within([tuple(range(i, i + 5)) for i in range(0, 100, 5)]),
    # 2->7, 3->8, 5<->6, 7->1 (Patrini et al. 2017)
    "mnist": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    # Ours (no standard map exists): visually similar pairs of Fashion-MNIST classes
    # 0 T-shirt/top -> 6 Shirt, 2 Pullover -> 4 Coat, 3 Dress -> 0 T-shirt/top,
    # 5 Sandal -> 7 Sneaker, 7 Sneaker -> 9 Ankle boot. Trouser (1), Coat (4), Shirt (6), Bag (8) and
    # Ankle boot (9) keep their labels.
    "fashion-mnist": {0: 6, 2: 4, 3: 0, 5: 7, 7: 9},
}


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (round(12.5) == 12); counts here round half up, as documented.
    return int(np.floor(x + 0.5))


def _as_labels(labels, num_classes: int | None = None, name: str = "labels") -> np.ndarray:
    if hasattr(labels, "detach"):  # torch tensor without importing torch here
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=True)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            bad = int(np.flatnonzero((arr < 0) | ((arr >= num_classes) if num_classes is not None else False))[0])
            raise ValueError(f"{name}[{bad}] = {arr[bad]} is out of range: class indices must be {bound}")
    return arr


def _check_rate(rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    return rate


def class_counts(labels, num_classes: int | None = None) -> np.ndarray:
    """Number of samples of each class (length ``num_classes``, default ``max(labels) + 1``)."""
    arr = _as_labels(labels, num_classes)
    return np.bincount(arr, minlength=num_classes or 0)


# ---------------------------------------------------------------- long tail
def _exp_counts(n_max: int, imbalance: float, C: int) -> list[int]:
    if C == 1:
        return [n_max]
    return [int(n_max * imbalance ** (c / (C - 1))) for c in range(C)]


def _step_counts(n_max: int, imbalance: float, C: int) -> list[int]:
    head = C // 2
    return [n_max] * head + [int(n_max * imbalance)] * (C - head)


_PROFILES: dict[str, Callable[[int, float, int], list[int]]] = {"exp": _exp_counts, "step": _step_counts}


def long_tailed_counts(n_max: int, imbalance: float, num_classes: int, profile: str = "exp") -> list[int]:
    """Target per-class sizes of the long-tailed subset (before capping at what each class has)."""
    if profile not in _PROFILES:
        raise ValueError(f"unknown imbalance profile {profile!r}; valid: {', '.join(PROFILES)}")
    imbalance = float(imbalance)
    if not 0.0 < imbalance <= 1.0:
        hint = f" (did you mean {1 / imbalance:g}?)" if imbalance > 1 else ""
        raise ValueError(f"imbalance must be n_min/n_max in (0, 1], e.g. 0.01; got {imbalance}{hint}")
    return _PROFILES[profile](int(n_max), imbalance, int(num_classes))


def make_long_tailed(labels, imbalance: float, profile: str = "exp", seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random long-tailed subset of ``labels``.

    Class c (index order, C = max(labels) + 1) keeps ``n_c = int(n_max * imbalance**(c/(C-1)))`` samples
    (``profile="exp"``) where n_max is the size of the largest class in ``labels``; ``profile="step"`` keeps
    n_max for the first C // 2 classes and ``int(n_max * imbalance)`` for the others. A class with fewer
    samples than its target keeps all of them.
    """
    arr = _as_labels(labels)
    if arr.size == 0:
        raise ValueError("labels is empty: nothing to make long-tailed")
    counts = np.bincount(arr)
    targets = long_tailed_counts(int(counts.max()), imbalance, len(counts), profile)
    rng = np.random.default_rng(seed)
    order = np.argsort(arr, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kept = []
    for c, n_c in enumerate(targets):
        members = order[starts[c]:starts[c] + counts[c]]
        take = min(n_c, counts[c])
        kept.append(rng.choice(members, size=take, replace=False) if take < counts[c] else members)
    return np.sort(np.concatenate(kept)).astype(np.int64)


# ---------------------------------------------------------------- label noise
def _no_noise(labels, rate, num_classes, convention, dataset, rng) -> np.ndarray:
    return labels.copy()


def _sym_noise(labels, rate, num_classes, convention, dataset, rng) -> np.ndarray:
    out = labels.copy()
    if rate == 0.0 or labels.size == 0:
        return out
    if convention == "prior":
        prior = np.bincount(labels, minlength=num_classes) / labels.size
        resample = rng.random(labels.size) < rate
        out[resample] = rng.choice(num_classes, size=int(resample.sum()), p=prior)
        return out
    if num_classes < 2:
        raise ValueError("symmetric 'exact' noise needs num_classes >= 2 (a flip must go to another class)")
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        k = _round_half_up(rate * members.size)
        if k == 0:
            continue
        flip = rng.choice(members, size=k, replace=False)
        # uniform over the C-1 other classes: draw from 0..C-2 and skip over c
        other = rng.integers(0, num_classes - 1, size=k)
        out[flip] = other + (other >= c)
    return out


def _asym_noise(labels, rate, num_classes, convention, dataset, rng) -> np.ndarray:
    if dataset is None:
        raise ValueError(f"asymmetric noise needs dataset=...; valid: {', '.join(ASYM_MAPS)}")
    if dataset not in ASYM_MAPS:
        raise ValueError(f"no asymmetric noise map for dataset {dataset!r}; valid: {', '.join(ASYM_MAPS)}")
    mapping = ASYM_MAPS[dataset]
    need = max(max(mapping), max(mapping.values())) + 1
    if num_classes < need:
        raise ValueError(f"the {dataset!r} asymmetric map uses class indices up to {need - 1}, "
                         f"but num_classes = {num_classes}")
    out = labels.copy()
    if rate == 0.0:
        return out
    if convention == "prior":
        # one uniform draw per sample, in sample order, so the result depends on the seed only
        u = rng.random(labels.size)
        for src, dst in mapping.items():
            out[(labels == src) & (u < rate)] = dst
        return out
    for src in sorted(mapping):
        members = np.flatnonzero(labels == src)
        k = _round_half_up(rate * members.size)
        if k:
            out[rng.choice(members, size=k, replace=False)] = mapping[src]
    return out


NOISE_KINDS: dict[str, Callable[..., np.ndarray]] = {"none": _no_noise, "sym": _sym_noise, "asym": _asym_noise}


def add_label_noise(labels, kind: str, rate: float, num_classes: int, convention: str = "prior",
                    dataset: str | None = None, seed: int = 0) -> np.ndarray:
    """New int64 label array with synthetic noise; ``labels`` is not modified.

    kind: ``none`` (a copy), ``sym`` or ``asym`` (``dataset`` picks the map in ASYM_MAPS).
    convention: ``prior`` (each sample independently: ``sym`` resamples from the class prior of ``labels``
    with probability ``rate``; ``asym`` moves a sample of a mapped class with probability ``rate``) or
    ``exact`` (exactly ``round(rate * n_c)`` samples of each (mapped) class change label, half rounded up).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(KINDS)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown noise convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    rate = _check_rate(rate)
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    arr = _as_labels(labels, num_classes)
    rng = np.random.default_rng(seed)
    return NOISE_KINDS[kind](arr, rate, num_classes, convention, dataset, rng)


def parse_noise(spec: str) -> tuple[str, float]:
    """``"sym:0.4"`` -> ("sym", 0.4); ``"none"`` -> ("none", 0.0). The command-line form of DESIGN.md section 7."""
    kind, _, rate = str(spec).partition(":")
    if kind not in NOISE_KINDS:
        raise ValueError(f"--noise {spec!r}: unknown kind {kind!r}; valid: {', '.join(KINDS)} (e.g. sym:0.4)")
    if kind == "none":
        if rate:
            raise ValueError(f"--noise {spec!r}: 'none' takes no rate")
        return kind, 0.0
    try:
        value = float(rate)
    except ValueError:
        raise ValueError(f"--noise {spec!r}: expected KIND:RATE such as {kind}:0.4") from None
    return kind, _check_rate(value)


def noise_summary(given, true, num_classes: int | None = None) -> dict:
    """Actual noise of ``given`` against ``true`` labels, JSON-ready (manifests, logs).

    Returns ``{"n", "flipped", "rate", "per_class"}`` where ``per_class[c]`` is the fraction of samples whose
    true class is c that carry another label (None for a class with no samples). Samples with a true label
    of -1 (unknown) are left out.
    """
    g = _as_labels(given, None, "given")
    t = np.asarray(true.detach().cpu().numpy() if hasattr(true, "detach") else true).astype(np.int64)
    if g.shape != t.shape:
        raise ValueError(f"given and true must have the same length, got {g.shape} and {t.shape}")
    known = t >= 0
    g, t = g[known], t[known]
    C = num_classes if num_classes is not None else int(max(g.max(initial=-1), t.max(initial=-1)) + 1)
    wrong = g != t
    total = np.bincount(t, minlength=C)
    flipped = np.bincount(t[wrong], minlength=C)
    per_class = [float(f / n) if n else None for f, n in zip(flipped, total)]
    return {"n": int(t.size), "flipped": int(wrong.sum()), "rate": float(wrong.mean()) if t.size else 0.0,
            "per_class": per_class}
