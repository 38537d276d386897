"""Loss-rank buckets and hierarchical metadata sampling (dynloss/sampling.py).

    .venv/bin/python -m pytest tests/test_sampling.py -q
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from dynloss.noise import long_tailed_counts
from dynloss.sampling import clean_seed, hierarchical_sample, loss_ranks, meta_set_sizes


def lt_labels(counts, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


# ---------------------------------------------------------------- loss_ranks
def test_loss_ranks_hand_example():
    labels = np.array([0, 0, 1, 0, 2, 2])
    losses = np.array([0.3, 0.1, 5.0, 0.2, 0.0, 1.0])
    # class 0 (n=3): 0.1 -> j=0 -> 0, 0.2 -> j=1 -> floor(1/4*100)=25, 0.3 -> j=2 -> 50
    # class 2 (n=2): 0.0 -> 0, 1.0 -> floor(1/3*100) = 33; class 1 (n=1): 0
    assert loss_ranks(labels, losses).tolist() == [50, 0, 0, 25, 0, 33]
    assert loss_ranks(labels, losses, num_buckets=4).tolist() == [2, 0, 0, 1, 0, 1]


def brute_force_ranks(labels, losses, R):
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(losses[idx], kind="stable")]
        for j, i in enumerate(idx):
            out[i] = math.floor(Fraction(j, len(idx) + 1) * R)
    return out


def test_loss_ranks_match_formula_in_range_and_monotone():
    rng = np.random.default_rng(0)
    labels = lt_labels([700, 120, 33, 5, 1])
    losses = rng.exponential(size=labels.size)
    losses[:50] = losses[50]  # ties
    r = loss_ranks(labels, losses)
    assert r.dtype == np.int64
    assert np.array_equal(r, brute_force_ranks(labels, losses, 100))
    assert r.min() >= 0 and r.max() < 100
    for c in range(5):
        idx = np.flatnonzero(labels == c)
        assert np.all(np.diff(r[idx][np.argsort(losses[idx], kind="stable")]) >= 0)
    # a big class uses (almost) every bucket, so the corrector sees the whole curve
    assert len(np.unique(r[labels == 0])) == 100


def test_loss_ranks_torch_in_torch_out():
    rng = np.random.default_rng(1)
    labels = lt_labels([300, 40, 9])
    losses = rng.normal(size=labels.size).astype(np.float32)
    r_t = loss_ranks(torch.from_numpy(labels), torch.from_numpy(losses), num_buckets=10)
    assert isinstance(r_t, torch.Tensor) and r_t.dtype == torch.long
    assert np.array_equal(r_t.numpy(), loss_ranks(labels, losses, num_buckets=10))
    r_c = loss_ranks(torch.from_numpy(labels), torch.from_numpy(losses), num_buckets=10, num_classes=5)
    assert torch.equal(r_c, r_t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_loss_ranks_on_gpu_stays_there():
    labels = torch.from_numpy(lt_labels([300, 40, 9]))
    losses = torch.rand(labels.numel())
    r = loss_ranks(labels.cuda(), losses.cuda(), num_classes=3)
    assert r.device.type == "cuda" and torch.equal(r.cpu(), loss_ranks(labels, losses))


def test_loss_ranks_errors():
    with pytest.raises(ValueError, match="same length"):
        loss_ranks(np.array([0, 1]), np.array([0.1]))
    with pytest.raises(ValueError, match="same length"):
        loss_ranks(torch.tensor([0, 1]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="num_buckets"):
        loss_ranks(np.array([0]), np.array([0.1]), num_buckets=0)


# ---------------------------------------------------------------- hierarchical_sample
def test_cifar10_rho_001_gives_about_12_per_class():
    counts = long_tailed_counts(5000, 0.01, 10)
    assert min(counts) == 50
    labels = lt_labels(counts)
    losses = np.random.default_rng(0).random(labels.size)
    assert meta_set_sizes(labels) == (25, 13)  # 0.5 * 50 = 25, 0.5 * 25 = 12.5 -> 13 (half up)
    idx = hierarchical_sample(labels, losses)
    assert np.bincount(labels[idx]).tolist() == [13] * 10
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize("criterion", ["easy", "hard", "mixed", "random"])
def test_balanced_counts_for_every_criterion(criterion):
    labels = lt_labels([900, 300, 80, 41])
    losses = np.random.default_rng(2).random(labels.size)
    idx = hierarchical_sample(labels, losses, ratio1=0.5, ratio2=0.5, criterion=criterion, seed=3)
    assert np.bincount(labels[idx]).tolist() == [11] * 4  # 41 * 0.5 = 20.5 -> 21, 21 * 0.5 = 10.5 -> 11


def test_easy_takes_lowest_and_hard_highest_loss():
    # ratio1 = 1 on balanced classes: level 1 is the whole class, so level 2 is a plain per-class top-k
    labels = lt_labels([40] * 5)
    losses = np.random.default_rng(4).random(labels.size)
    k = 10  # round(0.25 * 40)
    for criterion, expect in [("easy", lambda l: np.argsort(l)[:k]), ("hard", lambda l: np.argsort(l)[-k:]),
                              ("mixed", lambda l: np.concatenate([np.argsort(l)[:5], np.argsort(l)[-5:]]))]:
        idx = hierarchical_sample(labels, losses, ratio1=1.0, ratio2=0.25, criterion=criterion)
        for c in range(5):
            members = np.flatnonzero(labels == c)
            assert set(idx[labels[idx] == c]) == set(members[expect(losses[members])]), (criterion, c)


def test_easy_and_hard_split_the_same_level1_draw():
    # with imbalance level 1 is a random subset; the same seed draws the same subset for every criterion,
    # so in each class no easy pick has a higher loss than a hard pick (they share one sample when
    # 2 * level2 > level1, as for the class of 30: 15 drawn, 8 kept)
    labels = lt_labels([500, 200, 30])
    losses = np.random.default_rng(5).random(labels.size)
    easy = hierarchical_sample(labels, losses, criterion="easy", seed=9)
    hard = hierarchical_sample(labels, losses, criterion="hard", seed=9)
    for c in range(3):
        e, h = easy[labels[easy] == c], hard[labels[hard] == c]
        assert losses[e].max() <= losses[h].min()
    # and easy picks are far below the class's typical loss (they are not a random draw)
    assert losses[easy].mean() < 0.3 and losses[hard].mean() > 0.7


def test_sizes_rounding_and_per_class():
    labels = lt_labels([900, 300, 80, 41])
    assert meta_set_sizes(labels) == (21, 11)  # 20.5 -> 21, 10.5 -> 11
    losses = np.zeros(labels.size)
    assert np.bincount(labels[hierarchical_sample(labels, losses)]).tolist() == [11] * 4
    idx = hierarchical_sample(labels, losses, per_class=60, ratio2=1.0)
    assert np.bincount(labels[idx]).tolist() == [60, 60, 60, 41], "per_class capped at the class size"
    assert meta_set_sizes(labels, ratio1=0.01, ratio2=0.01) == (1, 1), "never an empty class"


def test_clean_ids_always_included_and_count_toward_quota():
    labels = lt_labels([400, 400, 100])
    # clean samples have the *highest* loss, so 'easy' would never pick them by itself
    losses = np.random.default_rng(6).random(labels.size)
    clean = np.concatenate([np.flatnonzero(labels == 0)[:3], np.flatnonzero(labels == 2)[:30]])
    losses[clean] = 10.0
    idx = hierarchical_sample(labels, losses, criterion="easy", clean_ids=clean)
    assert set(clean) <= set(idx)
    counts = np.bincount(labels[idx]).tolist()
    k2 = meta_set_sizes(labels)[1]  # round(0.5 * round(0.5 * 100)) = 25
    assert k2 == 25
    # class 0: 3 clean + 22 enriched; class 1: 25 enriched; class 2 has more clean (30) than the quota
    assert counts == [25, 25, 30]
    enriched = np.setdiff1d(idx, clean)
    assert losses[enriched].max() < 1.0


def test_determinism_and_seed_dependence():
    labels = lt_labels([300, 200, 100])
    losses = np.random.default_rng(7).random(labels.size)
    a = hierarchical_sample(labels, losses, seed=0)
    assert np.array_equal(a, hierarchical_sample(labels, losses, seed=0))
    assert not np.array_equal(a, hierarchical_sample(labels, losses, seed=1))
    r = hierarchical_sample(labels, None, criterion="random", seed=0)
    assert np.bincount(labels[r]).tolist() == [25] * 3
    t = hierarchical_sample(torch.from_numpy(labels), torch.from_numpy(losses), seed=0)
    assert np.array_equal(a, t)


def test_hierarchical_sample_errors():
    labels, losses = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="ratio1 must be in"):
            hierarchical_sample(labels, losses, ratio1=bad)
        with pytest.raises(ValueError, match="ratio2 must be in"):
            hierarchical_sample(labels, losses, ratio2=bad)
    with pytest.raises(ValueError, match="easy, hard, mixed, random"):
        hierarchical_sample(labels, losses, criterion="median")
    with pytest.raises(ValueError, match="same length"):
        hierarchical_sample(labels, losses[:3])
    with pytest.raises(ValueError, match="needs losses"):
        hierarchical_sample(labels, None)
    with pytest.raises(ValueError, match="clean_ids"):
        hierarchical_sample(labels, losses, clean_ids=[4])
    with pytest.raises(ValueError, match="per_class"):
        hierarchical_sample(labels, losses, per_class=0)


def test_clean_seed_takes_right_labels_only_up_to_per_class_and_is_fixed_by_its_seed():
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(4), [50, 30, 6, 2])
    given = np.where(rng.random(true.size) < 0.4, rng.integers(0, 4, true.size), true)
    idx = clean_seed(given, true, per_class=5, seed=1)
    assert (given[idx] == true[idx]).all()
    right = np.bincount(given[given == true], minlength=4)
    assert np.bincount(given[idx], minlength=4).tolist() == np.minimum(right, 5).tolist()
    assert np.array_equal(idx, clean_seed(given, true, per_class=5, seed=1))
    assert not np.array_equal(idx, clean_seed(given, true, per_class=5, seed=2))
    assert clean_seed(given, np.full_like(true, -1), per_class=5).size == 0  # truth unknown: nothing is known right
    with pytest.raises(ValueError, match="per_class"):
        clean_seed(given, true, per_class=0)


def test_flipped_labels_finds_a_label_the_classifier_gives_to_another_class():
    from dynloss.sampling import flipped_labels

    # label 0: 60% predicted 0, the rest spread (symmetric noise); label 1: 90% predicted 2 (flipped in from 2);
    # label 2: predicted 2; label 3: no rows at all
    labels = np.repeat([0, 1, 2], [100, 50, 40])
    preds = np.concatenate([np.repeat([0, 1, 2], [60, 20, 20]), np.repeat([1, 2], [4, 46]), np.full(40, 2)])
    found, ratio = flipped_labels(labels, preds, num_classes=4, ratio=0.125)
    assert found == [1] and ratio == pytest.approx(4 / 46)
    assert flipped_labels(labels, preds, num_classes=4, ratio=0.05) == ([], pytest.approx(4 / 46))
    assert flipped_labels(torch.as_tensor(labels), torch.as_tensor(preds), 4, 0.125)[0] == [1]
    assert flipped_labels(np.zeros(3, np.int64), np.zeros(3, np.int64), 2, 0.5) == ([], float("inf"))
    with pytest.raises(ValueError):
        flipped_labels(labels, preds[:-1], 4, 0.125)
