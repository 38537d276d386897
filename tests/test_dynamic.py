"""Label corrector, margin generator and the dynamic loss: initial behaviour and the formula."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynloss.dynamic import DynamicLoss, LabelCorrector, MarginGenerator


def test_corrector_starts_trusting_every_label():
    torch.manual_seed(0)
    lc = LabelCorrector(10)
    curves = lc.curves()
    assert curves.shape == (10, 100)
    # last bias 3.98 with Xavier weights on a small embedding: w ~= sigmoid(3.98) = 0.982 everywhere
    assert abs(float(curves.mean()) - 1 / (1 + math.exp(-3.98))) < 0.01
    assert float(curves.min()) > 0.9


def test_corrector_parameters_match_the_authors_layout():
    lc = LabelCorrector(7, rank_buckets=100, hidden=64)
    assert lc.embedding.weight.shape == (100, 64)
    linears = [m for m in lc.mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(64, 64), (64, 64), (7, 64)]
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in linears[:-1])
    assert torch.allclose(linears[-1].bias, torch.full((7,), 3.98))


def test_corrected_labels_are_distributions_mixing_label_and_prediction():
    torch.manual_seed(0)
    dyn = DynamicLoss(5)
    z = torch.randn(64, 5)
    y = torch.randint(0, 5, (64,))
    r = torch.randint(0, 100, (64,))
    for mix in ("gumbel", "softmax"):
        out = dyn(z, y, r, mix=mix)
        assert torch.allclose(out.target.sum(1), torch.ones(64), atol=1e-6)
        assert bool((out.target >= 0).all())
        # the given label keeps at least weight w
        assert bool((out.target.gather(1, y[:, None]).squeeze(1) >= out.trust - 1e-6).all())
    pseudo = dyn.pseudo_labels(z, "gumbel")
    assert torch.equal(pseudo.sum(1), torch.ones(64)) and set(pseudo.unique().tolist()) <= {0.0, 1.0}


def test_dynamic_loss_is_soft_cross_entropy_of_margin_shifted_logits():
    torch.manual_seed(1)
    dyn = DynamicLoss(4)
    z = torch.randn(8, 4, requires_grad=True)
    y = torch.randint(0, 4, (8,))
    r = torch.randint(0, 100, (8,))
    pseudo = dyn.pseudo_labels(z, "softmax")
    out = dyn(z, y, r, pseudo=pseudo)
    w = dyn.corrector.trust(r, y)
    target = w[:, None] * F.one_hot(y, 4) + (1 - w[:, None]) * z.detach().softmax(1)
    expected = -(target * F.log_softmax(z + dyn.margins(), 1)).sum(1).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert torch.isfinite(z.grad).all()


def test_margin_generator_log_prior_starts_at_logit_adjustment():
    counts = np.array([1000, 300, 100, 10])
    dyn = DynamicLoss(4, class_counts=counts, margin_prior="log_prior")
    plain = MarginGenerator(4)
    plain.load_state_dict({k: v for k, v in dyn.margins.state_dict().items() if k != "log_prior"}, strict=False)
    delta = dyn.margins() - plain()
    log_prior = torch.log(torch.tensor(counts / counts.sum(), dtype=torch.float32))
    assert torch.allclose(delta, log_prior, atol=1e-5)
    # exactly logit adjustment plus one constant (softmax ignores it): no random per-class offset at the start
    m = dyn.margins().detach()
    assert torch.allclose(m - m.mean(), log_prior - log_prior.mean(), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"margin_prior": "bogus"}, "margin_prior"),
    ({"margin_prior": "log_prior"}, "class_counts"),
    ({"margin_prior": "log_prior", "class_counts": [5, 0, 3]}, "positive"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLoss(3, **kwargs)
    with pytest.raises(ValueError, match="mix"):
        DynamicLoss(3).pseudo_labels(torch.zeros(2, 3), "hard")


def test_smooth_rank_codes_make_neighbouring_buckets_alike():
    torch.manual_seed(0)
    smooth = LabelCorrector(5, rank_init="smooth").embedding.weight.detach()
    xavier = LabelCorrector(5, rank_init="xavier").embedding.weight.detach()

    def neighbour_cosine(e):
        return float(F.cosine_similarity(e[:-1], e[1:], dim=1).mean())

    assert neighbour_cosine(smooth) > 0.9 > 0.3 > neighbour_cosine(xavier)
    assert float(smooth.std()) == pytest.approx(float(xavier.std()), rel=0.2)  # same spread as the authors' init
    with pytest.raises(ValueError, match="rank_init"):
        LabelCorrector(5, rank_init="sorted")
