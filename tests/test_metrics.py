"""Accuracy, shot-split and label-correction metrics (dynloss/metrics.py) on hand-computed examples.

    .venv/bin/python -m pytest tests/test_metrics.py -q
"""
import math

import numpy as np
import pytest
import torch

from dynloss.metrics import correction_metrics, per_class_accuracy, roc_auc, shot_split_accuracy, topk_accuracy


def test_topk_hand_example():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2],    # target 1: top-1 hit
                           [0.8, 0.1, 0.5, 0.3],    # target 2: second -> top-2 hit
                           [0.9, 0.0, 0.1, 0.5]])   # target 1: last -> miss at k <= 3
    target = torch.tensor([1, 2, 1])
    acc = topk_accuracy(logits, target, ks=(1, 2, 3, 5))
    assert acc[1] == pytest.approx(1 / 3)
    assert acc[2] == pytest.approx(2 / 3)
    assert acc[3] == pytest.approx(2 / 3)
    assert acc[5] == pytest.approx(1.0), "k above the class count is capped at it"
    assert topk_accuracy(logits.numpy(), target.numpy(), ks=(1,)) == {1: pytest.approx(1 / 3)}


def test_per_class_accuracy_with_missing_class():
    preds = np.array([0, 1, 1, 2, 0, 2])
    targets = np.array([0, 1, 2, 2, 0, 0])
    acc = per_class_accuracy(preds, targets, 4)
    assert acc[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.5])
    assert math.isnan(acc[3])
    # logits are reduced by argmax; torch works too
    logits = torch.nn.functional.one_hot(torch.from_numpy(preds), 4).float()
    assert np.allclose(per_class_accuracy(logits, torch.from_numpy(targets), 4)[:3], acc[:3])


def test_shot_split_uses_class_mean_and_thresholds():
    train_counts = [500, 150, 100, 50, 20, 19, 3]
    #   many (>100): classes 0, 1; medium (20..100): 2, 3, 4; few (<20): 5, 6
    targets = np.array([0, 0, 0, 0, 1, 2, 3, 4, 4, 5, 6, 6])
    preds = np.array([0, 0, 0, 1, 0, 2, 3, 4, 0, 5, 0, 0])
    # per class: 0 -> 3/4, 1 -> 0, 2 -> 1, 3 -> 1, 4 -> 1/2, 5 -> 1, 6 -> 0
    out = shot_split_accuracy(preds, targets, train_counts)
    assert out["many"] == pytest.approx((0.75 + 0.0) / 2)  # class mean, not the 3/5 sample mean
    assert out["medium"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert out["few"] == pytest.approx(0.5)
    small = shot_split_accuracy(preds, targets, train_counts, many=1000, few=2)
    assert math.isnan(small["many"]) and math.isnan(small["few"])
    with pytest.raises(ValueError, match="few"):
        shot_split_accuracy(preds, targets, train_counts, many=10, few=20)


def brute_force_auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 6, size=80).astype(float)  # many ties
        positive = rng.random(80) < 0.3
        assert roc_auc(scores, positive) == pytest.approx(brute_force_auc(scores, positive))
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    assert roc_auc([0.5, 0.5], [False, True]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))


def test_correction_metrics_hand_example():
    trust = np.array([0.9, 0.2, 0.8, 0.1, 0.7, 0.4, 0.95])
    given = np.array([0, 1, 2, 3, 1, 0, 2])
    true = np.array([0, 0, 2, 1, 0, 0, -1])  # noisy: samples 1, 3, 4; the last one is unknown
    m = correction_metrics(trust, given, true, threshold=0.5)
    # flagged (trust < 0.5): 1, 3, 5 -> hits 1, 3: precision 2/3, recall 2/3
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["trust_noisy"] == pytest.approx((0.2 + 0.1 + 0.7) / 3)
    assert m["trust_clean"] == pytest.approx((0.9 + 0.8 + 0.4) / 3)
    # 1 - trust; noisy {0.8, 0.9, 0.3} vs clean {0.1, 0.2, 0.6}: pairs won 3 + 3 + 2 = 8 of 9
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["noise_rate"] == pytest.approx(0.5) and m["flagged_rate"] == pytest.approx(0.5)
    t = correction_metrics(torch.tensor(trust), torch.tensor(given), torch.tensor(true))
    assert t == pytest.approx(m)


def test_correction_metrics_undefined_values_are_nan():
    m = correction_metrics(np.ones(4), np.arange(4), np.arange(4))
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["auc"])
    assert math.isnan(m["trust_noisy"]) and m["trust_clean"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        correction_metrics(np.ones(3), np.arange(4), np.arange(4))
