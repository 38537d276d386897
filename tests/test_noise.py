"""Long-tail and label-noise protocols (dynloss/noise.py).

    .venv/bin/python -m pytest tests/test_noise.py -q
"""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from dynloss.noise import (
    ASYM_MAPS,
    CIFAR100_SUPERCLASSES,
    add_label_noise,
    long_tailed_counts,
    make_long_tailed,
    noise_summary,
    parse_noise,
)

FMNIST_TRAIN_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")

# The CIFAR-100 fine -> coarse label table as published with the dataset's meta file (widely reproduced as
# `sparse2coarse`); an independent check of the superclass table written in dynloss/noise.py.
CIFAR100_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
                   6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
                   5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
                   10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
                   16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


def balanced(per_class, num_classes, seed=0):
    y = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(y)


# ---------------------------------------------------------------- long tail
def test_long_tail_counts_match_formula_fashion_mnist_like():
    y = balanced(6000, 10)
    keep = make_long_tailed(y, 0.01)
    counts = np.bincount(y[keep], minlength=10)
    expected = [int(6000 * 0.01 ** (c / 9)) for c in range(10)]
    assert counts.tolist() == expected
    assert counts[0] == 6000 and counts[-1] == 60
    assert counts.sum() == 14886  # DESIGN.md section 8
    assert np.all(np.diff(keep) > 0), "kept indices are sorted and unique"


@pytest.mark.skipif(not FMNIST_TRAIN_LABELS.exists(), reason="Fashion-MNIST not installed")
def test_long_tail_on_real_fashion_mnist_labels():
    with gzip.open(FMNIST_TRAIN_LABELS) as f:
        y = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    keep = make_long_tailed(y, 0.1, seed=1)
    assert np.bincount(y[keep]).tolist() == [int(6000 * 0.1 ** (c / 9)) for c in range(10)]
    assert len(keep) == 24516  # DESIGN.md section 8, second setting


def test_long_tail_step_profile_and_small_classes():
    y = balanced(1000, 6)
    assert np.bincount(y[make_long_tailed(y, 0.1, profile="step")]).tolist() == [1000] * 3 + [100] * 3
    # a class smaller than its target keeps everything it has
    y2 = np.concatenate([np.zeros(100, int), np.ones(3, int), np.full(100, 2)])
    assert np.bincount(y2[make_long_tailed(y2, 0.5)]).tolist() == [100, 3, 50]


def test_long_tail_seeded_random_subset():
    y = balanced(500, 5)
    a, b, c = (make_long_tailed(y, 0.1, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(np.bincount(y[a]), np.bincount(y[c]))
    # the kept samples of a class are not just its first ones
    assert not np.array_equal(a[y[a] == 4], np.flatnonzero(y == 4)[: (y[a] == 4).sum()])


def test_long_tail_errors():
    y = balanced(10, 3)
    with pytest.raises(ValueError, match=r"did you mean 0\.01"):
        make_long_tailed(y, 100)
    with pytest.raises(ValueError, match="exp, step"):
        make_long_tailed(y, 0.1, profile="linear")
    with pytest.raises(ValueError, match="out of range"):
        make_long_tailed(np.array([0, -1]), 0.1)
    assert long_tailed_counts(5000, 0.01, 10)[-1] == 50


# ---------------------------------------------------------------- symmetric noise
def test_sym_exact_flips_exactly_round_rate_n_per_class():
    counts = [1000, 400, 25, 7]  # 25 * 0.5 = 12.5 -> 13 (half up), 7 * 0.5 = 3.5 -> 4
    y = np.random.default_rng(3).permutation(np.repeat(np.arange(4), counts))
    for rate in (0.2, 0.5):
        z = add_label_noise(y, "sym", rate, 4, convention="exact", seed=5)
        flipped = np.bincount(y[z != y], minlength=4)
        assert flipped.tolist() == [int(np.floor(rate * n + 0.5)) for n in counts]
    assert np.array_equal(np.bincount(y, minlength=4), counts), "input untouched"


def test_sym_exact_targets_are_uniform_over_other_classes():
    y = balanced(30000, 3)
    z = add_label_noise(y, "sym", 0.4, 3, convention="exact")
    moved = z != y
    to = np.bincount(z[moved & (y == 0)], minlength=3)
    assert to[0] == 0
    assert abs(to[1] / to[1:].sum() - 0.5) < 0.02


def test_sym_prior_effective_rate_is_rate_times_one_minus_prior():
    counts = np.array([60000, 25000, 10000, 5000])
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(4), counts))
    rate = 0.4
    z = add_label_noise(y, "sym", rate, 4, convention="prior", seed=7)
    prior = counts / counts.sum()
    for c in range(4):
        eff = (z[y == c] != c).mean()
        expected = rate * (1 - prior[c])
        sigma = np.sqrt(expected * (1 - expected) / counts[c])
        assert abs(eff - expected) < 5 * sigma, (c, eff, expected)
    # the new label of a resampled sample follows the prior: the head class receives most flips
    assert np.argmax(np.bincount(z[z != y], minlength=4)) == 0


def test_sym_prior_calibration_setting_of_design_section_8():
    y = balanced(6000, 10)
    y = y[make_long_tailed(y, 0.01)]
    z = add_label_noise(y, "sym", 0.4, 10)
    p = np.bincount(y) / y.size
    assert abs(noise_summary(z, y)["rate"] - 0.4 * (1 - (p ** 2).sum())) < 0.01  # about 29.9%


# ---------------------------------------------------------------- asymmetric noise
@pytest.mark.parametrize("dataset,C", [("cifar10", 10), ("mnist", 10), ("fashion-mnist", 10),
                                       ("cifar100", 100), ("cifar100-blocks", 100)])
@pytest.mark.parametrize("convention", ["prior", "exact"])
def test_asym_flips_only_to_the_mapped_class(dataset, C, convention):
    y = balanced(400, C)
    rate = 0.3
    z = add_label_noise(y, "asym", rate, C, convention=convention, dataset=dataset, seed=2)
    mapping = ASYM_MAPS[dataset]
    moved = z != y
    for c in range(C):
        m = moved & (y == c)
        if c not in mapping:
            assert not m.any(), f"unmapped class {c} changed"
            continue
        assert np.all(z[m] == mapping[c])
        if convention == "exact":
            assert m.sum() == int(np.floor(rate * 400 + 0.5))
    mapped = np.isin(y, list(mapping))
    if convention == "prior":
        assert abs(moved[mapped].mean() - rate) < 0.05


def test_cifar10_pairs_and_swap():
    m = ASYM_MAPS["cifar10"]
    assert m == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    y = np.array([3] * 1000 + [5] * 1000)
    z = add_label_noise(y, "asym", 0.5, 10, convention="exact", dataset="cifar10")
    assert (z[:1000] == 5).sum() == 500 and (z[1000:] == 3).sum() == 500


def test_cifar100_superclass_table_matches_published_coarse_labels():
    assert len(CIFAR100_SUPERCLASSES) == 20 and all(len(g) == 5 for g in CIFAR100_SUPERCLASSES)
    assert sorted(i for g in CIFAR100_SUPERCLASSES for i in g) == list(range(100))
    for coarse, group in enumerate(CIFAR100_SUPERCLASSES):
        assert [CIFAR100_COARSE[i] for i in group] == [coarse] * 5
    m = ASYM_MAPS["cifar100"]
    assert sorted(m) == sorted(m.values()) == list(range(100)), "a permutation"
    assert all(CIFAR100_COARSE[a] == CIFAR100_COARSE[b] and a != b for a, b in m.items())
    assert m[2] == 11 and m[98] == 2  # people: baby -> boy, woman -> baby (cyclic)


def test_noise_is_deterministic_per_seed_and_differs_across_seeds():
    y = balanced(200, 10)
    for kind, kw in [("sym", {"convention": "prior"}), ("sym", {"convention": "exact"}),
                     ("asym", {"dataset": "cifar10"}), ("asym", {"dataset": "cifar10", "convention": "exact"})]:
        a = add_label_noise(y, kind, 0.4, 10, seed=0, **kw)
        b = add_label_noise(y, kind, 0.4, 10, seed=0, **kw)
        c = add_label_noise(y, kind, 0.4, 10, seed=1, **kw)
        assert np.array_equal(a, b) and not np.array_equal(a, c), (kind, kw)


def test_none_and_zero_rate_copy_and_torch_input():
    y = torch.arange(10).repeat(5)
    z = add_label_noise(y, "none", 0.0, 10)
    assert isinstance(z, np.ndarray) and z.dtype == np.int64 and np.array_equal(z, y.numpy())
    assert np.array_equal(add_label_noise(y, "sym", 0.0, 10, convention="exact"), y.numpy())
    z[0] = 9
    assert y[0] == 0


def test_noise_errors_name_the_problem():
    y = balanced(10, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        add_label_noise(y, "sym", 1.0, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        add_label_noise(y, "sym", -0.1, 10)
    with pytest.raises(ValueError, match="none, sym, asym"):
        add_label_noise(y, "pair", 0.2, 10)
    with pytest.raises(ValueError, match="prior, exact"):
        add_label_noise(y, "sym", 0.2, 10, convention="uniform")
    with pytest.raises(ValueError, match="needs dataset"):
        add_label_noise(y, "asym", 0.2, 10)
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        add_label_noise(y, "asym", 0.2, 10, dataset="svhn")
    with pytest.raises(ValueError, match=r"labels\[\d+\] = 10 is out of range"):
        add_label_noise(np.array([0, 10]), "sym", 0.2, 10)
    with pytest.raises(ValueError, match="out of range"):
        add_label_noise(np.array([0, -1]), "none", 0.0, 10)
    with pytest.raises(ValueError, match="up to 99"):
        add_label_noise(y, "asym", 0.2, 10, dataset="cifar100")


def test_parse_noise():
    assert parse_noise("sym:0.4") == ("sym", 0.4)
    assert parse_noise("none") == ("none", 0.0)
    with pytest.raises(ValueError, match="KIND:RATE"):
        parse_noise("asym:x")
    with pytest.raises(ValueError, match="valid"):
        parse_noise("flip:0.2")


def test_noise_summary_hand_example():
    true = np.array([0, 0, 0, 0, 1, 1, 2, -1])
    given = np.array([0, 1, 0, 2, 1, 0, 2, 1])
    s = noise_summary(given, true, num_classes=4)
    assert s["n"] == 7 and s["flipped"] == 3
    assert s["rate"] == pytest.approx(3 / 7)
    assert s["per_class"] == [0.5, 0.5, 0.0, None]
