"""Tests for dynloss.losses: every loss against its formula written out here, schedules, presets,
gradients, validation.

    .venv/bin/python -m pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynloss.losses import LOSSES, PRESETS, RobustLoss, build_loss

C = 10
COUNTS = [500, 300, 200, 120, 80, 50, 30, 20, 10, 5]
NEEDS_COUNTS = {"ldam", "logit_adjusted", "balanced_softmax"}
EXPECTED_NAMES = {
    "ce", "focal", "gce", "sce", "nce", "rce", "mae", "nfl", "nce+rce", "nce+mae", "nfl+rce",
    "agce", "aul", "ael", "nce+agce", "nce+aul", "nce+ael", "dal", "sr", "ldam", "logit_adjusted",
    "balanced_softmax",
}  # fmt: skip


def batch(seed: int = 0, n: int = 32, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (n,), generator=g)
    return z, y


def defaults_for(name: str) -> dict:
    return {"class_counts": COUNTS} if name in NEEDS_COUNTS else {}


# ---- the formulas, written out independently (float64, plain probabilities) -------------------
def onehot(y):
    return F.one_hot(y, C).double()


def p_and_py(z, y):
    p = torch.softmax(z, dim=1)
    return p, p[torch.arange(len(y)), y]


def ref_ce(z, y):
    return -p_and_py(z, y)[1].log()


def ref_focal(z, y, gamma=0.5):
    py = p_and_py(z, y)[1]
    return -((1 - py) ** gamma) * py.log()


def ref_gce(z, y, q=0.7):
    return (1 - p_and_py(z, y)[1] ** q) / q


def ref_rce(z, y):
    # -sum_k p_k log(label_k) with the one-hot label clamped to [1e-4, 1]
    p = torch.softmax(z, dim=1)
    return -(p * onehot(y).clamp(1e-4, 1).log()).sum(1)


def ref_mae_l1(z, y):
    return (torch.softmax(z, dim=1) - onehot(y)).abs().sum(1)


def ref_sce(z, y, alpha=0.1, beta=1.0):
    return alpha * ref_ce(z, y) + beta * ref_rce(z, y)


def ref_nce(z, y):
    p = torch.softmax(z, dim=1)
    return -p[torch.arange(len(y)), y].log() / (-p.log()).sum(1)


def ref_nfl(z, y, gamma=0.5):
    p = torch.softmax(z, dim=1)
    fl = -((1 - p) ** gamma) * p.log()
    return fl[torch.arange(len(y)), y] / fl.sum(1)


def ref_agce(z, y, a=0.6, q=0.6):
    py = p_and_py(z, y)[1]
    return ((a + 1) ** q - (a + py) ** q) / q


def ref_aul(z, y, a=5.5, q=3.0):
    py = p_and_py(z, y)[1]
    return ((a - py) ** q - (a - 1) ** q) / q


def ref_ael(z, y, a=2.5):
    return torch.exp(-p_and_py(z, y)[1] / a)


def ref_dal(z, y, q_start=0.6, q_end=1.5, epoch=0, total=1):
    q = q_start + (q_end - q_start) * epoch / total
    t0 = (1 - q_start) * total / (q_end - q_start)
    lam = max(0.0, (epoch - t0) / (total - t0))
    p = torch.softmax(z, dim=1)
    entropy = -(p * p.log()).sum(1)
    return ref_gce(z, y, q) + lam * entropy / (q * math.log(C))


def ref_sr(z, y, tau=0.5, p=0.1, lam=1.2, rho=1.03, epoch=0, base=ref_ce):
    zn = z / z.norm(dim=1, keepdim=True)
    s = zn / tau
    return base(s, y) + lam * rho**epoch * (torch.softmax(s, dim=1) ** p).sum(1)


def ref_ldam(z, y, class_counts=COUNTS, max_margin=0.5, s=30.0):
    n = torch.tensor(class_counts, dtype=torch.float64)
    m = 1 / n.sqrt().sqrt()
    m = m * max_margin / m.max()
    zm = z.clone()
    zm[torch.arange(len(y)), y] -= m[y]
    return F.cross_entropy(s * zm, y, reduction="none")


def ref_logit_adjusted(z, y, class_counts=COUNTS, tau=1.0):
    n = torch.tensor(class_counts, dtype=torch.float64)
    return F.cross_entropy(z + tau * (n / n.sum()).log(), y, reduction="none")


def ref_combo(active, passive):
    def f(z, y, alpha=1.0, beta=1.0, **kw):
        return alpha * active(z, y, **{k: v for k, v in kw.items() if k == "gamma"}) + beta * passive(
            z, y, **{k: v for k, v in kw.items() if k != "gamma"}
        )

    return f


REFS = {
    "ce": ref_ce,
    "focal": ref_focal,
    "gce": ref_gce,
    "sce": ref_sce,
    "nce": ref_nce,
    "rce": ref_rce,
    "mae": ref_mae_l1,
    "nfl": ref_nfl,
    "nce+rce": ref_combo(ref_nce, ref_rce),
    # the authors' nce+mae uses the reduced MAE 1 - p_y = L1 / 2
    "nce+mae": ref_combo(ref_nce, lambda z, y: ref_mae_l1(z, y) / 2),
    "nfl+rce": ref_combo(ref_nfl, ref_rce),
    "agce": ref_agce,
    "aul": ref_aul,
    "ael": ref_ael,
    "nce+agce": ref_combo(ref_nce, ref_agce),
    "nce+aul": ref_combo(ref_nce, ref_aul),
    "nce+ael": ref_combo(ref_nce, ref_ael),
    "dal": ref_dal,
    "sr": ref_sr,
    "ldam": ref_ldam,
    "logit_adjusted": ref_logit_adjusted,
    "balanced_softmax": ref_logit_adjusted,
}

# defaults each reference needs to match the class defaults of combos / losses
REF_DEFAULTS = {
    "nce+agce": {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5},
    "nce+aul": {"alpha": 1.0, "beta": 4.0, "a": 6.3, "q": 1.5},
    "nce+ael": {"alpha": 1.0, "beta": 4.0, "a": 5.0},
    "nfl+rce": {"gamma": 0.5},
}

# non-default parameters per loss: (build params, reference params)
CUSTOM = {
    "focal": {"gamma": 2.0},
    "gce": {"q": 0.3},
    "sce": {"alpha": 6.0, "beta": 0.1},
    "nfl": {"gamma": 1.5},
    "nce+rce": {"alpha": 10.0, "beta": 0.1},
    "nce+mae": {"alpha": 10.0, "beta": 1.0},
    "nfl+rce": {"alpha": 10.0, "beta": 0.1, "gamma": 1.0},
    "agce": {"a": 3.0, "q": 2.0},
    "aul": {"a": 1.5, "q": 0.9},
    "ael": {"a": 0.7},
    "nce+agce": {"alpha": 10.0, "beta": 0.1, "a": 1.8, "q": 3.0},
    "nce+aul": {"alpha": 10.0, "beta": 0.015, "a": 6.0, "q": 3.0},
    "nce+ael": {"alpha": 10.0, "beta": 0.1, "a": 1.5},
    "dal": {"q_start": 0.4, "q_end": 2.0},
    "sr": {"tau": 0.2, "p": 0.5, "lam": 3.0, "rho": 1.1},
    "ldam": {"class_counts": [7, 1, 3, 100, 2, 9, 40, 5, 5, 6], "max_margin": 1.0, "s": 10.0},
    "logit_adjusted": {"class_counts": COUNTS, "tau": 2.0},
}


def assert_matches(name, params, ref_params, seed=0, scale=3.0):
    z, y = batch(seed, scale=scale)
    loss = build_loss(name, C, **params)
    got = loss(z.float(), y)
    want = REFS[name](z, y, **ref_params).mean()
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


# ---- registry ---------------------------------------------------------------------------------
def test_registry_lists_every_name():
    assert set(LOSSES) == EXPECTED_NAMES
    assert all(issubclass(cls, RobustLoss) and cls.name == n for n, cls in LOSSES.items())


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_builds_with_defaults_and_accepts_set_epoch(name):
    loss = build_loss(name, C, **defaults_for(name))
    assert isinstance(loss, torch.nn.Module)
    z, y = batch(1)
    before = loss(z.float(), y)
    loss.set_epoch(5, 10)
    after = loss(z.float(), y)
    assert torch.isfinite(before) and torch.isfinite(after)
    if name not in ("dal", "sr"):
        assert torch.equal(before, after)  # set_epoch is a no-op for schedule-free losses
    assert set(loss.hparams()) == set(type(loss).param_names())


# ---- formulas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_defaults_match_formula(name):
    params = defaults_for(name)
    assert_matches(name, params, {**REF_DEFAULTS.get(name, {}), **params})


@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_custom_params_match_formula(name):
    assert_matches(name, CUSTOM[name], CUSTOM[name], seed=2)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_gradient_matches_formula(name):
    """The autograd gradient equals the formula's gradient: nothing is detached or clamped away."""
    z, y = batch(3)
    params = defaults_for(name)
    zf = z.float().requires_grad_(True)
    build_loss(name, C, **params)(zf, y).backward()
    zd = z.clone().requires_grad_(True)
    REFS[name](zd, y, **{**REF_DEFAULTS.get(name, {}), **params}).mean().backward()
    torch.testing.assert_close(zf.grad.double(), zd.grad, rtol=1e-4, atol=1e-6)


def test_mae_is_twice_one_minus_py():
    z, y = batch(4)
    py = p_and_py(z, y)[1]
    torch.testing.assert_close(build_loss("mae", C)(z.float(), y).double(), (2 * (1 - py)).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, params, parts",
    [
        ("nce+rce", {"alpha": 2.0, "beta": 0.5}, [("nce", {}, 1.0), ("rce", {}, 1.0)]),
        ("nce+mae", {"alpha": 2.0, "beta": 0.5}, [("nce", {}, 1.0), ("mae", {}, 0.5)]),
        ("nfl+rce", {"alpha": 3.0, "beta": 0.2, "gamma": 1.0}, [("nfl", {"gamma": 1.0}, 1.0), ("rce", {}, 1.0)]),
        (
            "nce+agce",
            {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5},
            [("nce", {}, 1.0), ("agce", {"a": 6.0, "q": 1.5}, 1.0)],
        ),
        (
            "nce+aul",
            {"alpha": 1.0, "beta": 4.0, "a": 6.3, "q": 1.5},
            [("nce", {}, 1.0), ("aul", {"a": 6.3, "q": 1.5}, 1.0)],
        ),
        ("nce+ael", {"alpha": 10.0, "beta": 0.1, "a": 1.5}, [("nce", {}, 1.0), ("ael", {"a": 1.5}, 1.0)]),
    ],
)
def test_combo_is_alpha_active_plus_beta_passive(name, params, parts):
    z, y = batch(5)
    z = z.float()
    (active, a_params, a_scale), (passive, p_params, p_scale) = parts
    want = params["alpha"] * a_scale * build_loss(active, C, **a_params)(z, y) + params["beta"] * p_scale * build_loss(
        passive, C, **p_params
    )(z, y)
    torch.testing.assert_close(build_loss(name, C, **params)(z, y), want, rtol=1e-5, atol=1e-6)


# ---- schedules --------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch", [0, 30, 66, 67, 100, 149, 150])
def test_dal_schedule_and_value(epoch):
    T = 150
    t0 = (1 - 0.6) * T / (1.5 - 0.6)  # 66.67 for the CIFAR preset
    loss = build_loss("dal", C, preset="cifar10")
    loss.set_epoch(epoch, T)
    assert loss.q == pytest.approx(0.6 + 0.9 * epoch / T)
    if epoch <= t0:
        assert loss.lam == 0.0
    else:
        assert loss.lam == pytest.approx((epoch - t0) / (T - t0)) and loss.lam > 0
    z, y = batch(6)
    got = loss(z.float(), y).double()
    torch.testing.assert_close(got, ref_dal(z, y, 0.6, 1.5, epoch, T).mean(), rtol=2e-5, atol=2e-5)
    if epoch <= t0:  # before t0 DAL is exactly GCE with the scheduled q
        torch.testing.assert_close(got, ref_gce(z, y, loss.q).mean(), rtol=2e-5, atol=2e-5)


def test_dal_defaults_to_start_of_training():
    loss = build_loss("dal", C, preset="webvision")
    assert (loss.q_start, loss.q_end) == (0.4, 1.5)
    assert (loss.q, loss.lam) == (0.4, 0.0)
    loss.set_epoch(249, 250)
    assert loss.lam == pytest.approx((249 - 0.6 * 250 / 1.1) / (250 - 0.6 * 250 / 1.1))


def test_sr_lambda_decay_and_value():
    loss = build_loss("sr", C, tau=0.5, p=0.01, lam=10.0, rho=1.02)
    assert loss.lam_t == 10.0
    for epoch in (1, 7, 50):
        loss.set_epoch(epoch, 200)
        assert loss.lam_t == pytest.approx(10.0 * 1.02**epoch)
    z, y = batch(7)
    loss.set_epoch(7, 200)
    want = ref_sr(z, y, tau=0.5, p=0.01, lam=10.0, rho=1.02, epoch=7).mean()
    torch.testing.assert_close(loss(z.float(), y).double(), want, rtol=2e-5, atol=2e-5)


def test_sr_with_gce_base():
    loss = build_loss("sr", C, base="gce", base_params={"q": 0.01})
    loss.set_epoch(3, 120)
    z, y = batch(8)
    want = ref_sr(z, y, epoch=3, base=lambda s, t: ref_gce(s, t, q=0.01)).mean()
    torch.testing.assert_close(loss(z.float(), y).double(), want, rtol=2e-5, atol=2e-5)


def test_sr_is_invariant_to_logit_scale():
    z, y = batch(9)
    loss = build_loss("sr", C)
    torch.testing.assert_close(loss(z.float(), y), loss(7.0 * z.float(), y), rtol=1e-5, atol=1e-6)


# ---- long tail --------------------------------------------------------------------------------
def test_ldam_margins():
    loss = build_loss("ldam", 4, class_counts=[10000, 625, 16, 1], max_margin=0.5)
    # n^(-1/4) = 0.1, 0.2, 0.5, 1 -> scaled so the rarest class gets max_margin
    torch.testing.assert_close(loss.margins, torch.tensor([0.05, 0.1, 0.25, 0.5]))
    z = torch.zeros(4, 4)
    y = torch.arange(4)
    # zero logits: the target logit drops by m_y, times s
    want = torch.stack([F.cross_entropy(30 * -F.one_hot(y[i], 4) * loss.margins[i], y[i]) for i in range(4)])
    torch.testing.assert_close(loss.per_sample(z, y), want)


def test_balanced_softmax_equals_logit_adjusted_tau_one():
    z, y = batch(10)
    a = build_loss("logit_adjusted", C, class_counts=COUNTS)(z.float(), y)
    b = build_loss("balanced_softmax", C, class_counts=COUNTS)(z.float(), y)
    torch.testing.assert_close(a, b)
    # the adjustment penalizes head classes: CE rises for a head-class target, falls for a tail one
    zero = torch.zeros(2, C)
    per = build_loss("logit_adjusted", C, class_counts=COUNTS).per_sample(zero, torch.tensor([0, C - 1]))
    assert per[0] < math.log(C) < per[1]


# ---- presets ----------------------------------------------------------------------------------
ALF_PRESETS = [
    ("cifar10", "agce", {"a": 0.6, "q": 0.6}),
    ("cifar10", "aul", {"a": 5.5, "q": 3.0}),
    ("cifar10", "ael", {"a": 2.5}),
    ("cifar10", "nce+agce", {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5}),
    ("cifar10", "nce+aul", {"alpha": 1.0, "beta": 4.0, "a": 6.3, "q": 1.5}),
    ("cifar10", "nce+ael", {"alpha": 1.0, "beta": 4.0, "a": 5.0}),
    ("cifar100", "nce+agce", {"alpha": 10.0, "beta": 0.1, "a": 1.8, "q": 3.0}),
]


@pytest.mark.parametrize("dataset, name, expected", ALF_PRESETS)
def test_alf_presets(dataset, name, expected):
    loss = build_loss(name, C, preset=dataset)
    assert loss.hparams() == expected
    z, y = batch(11)
    torch.testing.assert_close(loss(z.float(), y).double(), REFS[name](z, y, **expected).mean(), rtol=2e-5, atol=2e-5)


def test_other_presets_present():
    need = {"agce", "aul", "ael", "nce+agce", "nce+aul", "nce+ael", "gce", "sce", "dal", "focal"}
    assert need <= set(PRESETS["cifar10"])
    assert PRESETS["cifar10"]["gce"] == {"q": 0.7}
    assert PRESETS["cifar10"]["focal"] == {"gamma": 0.5}
    assert PRESETS["cifar10"]["dal"] == {"q_start": 0.6, "q_end": 1.5}
    assert PRESETS["webvision"]["dal"] == {"q_start": 0.4, "q_end": 1.5}
    for dataset, table in PRESETS.items():  # every preset entry builds
        for name in table:
            build_loss(name, 50 if "webvision" in dataset else C, preset=dataset)


def test_explicit_params_override_preset():
    loss = build_loss("nce+agce", C, preset="cifar10", beta=2.0)
    assert loss.hparams() == {"alpha": 1.0, "beta": 2.0, "a": 6.0, "q": 1.5}
    assert build_loss("agce", C, preset="CIFAR10").hparams() == {"a": 0.6, "q": 0.6}


# ---- numerics ---------------------------------------------------------------------------------
def extreme_logits():
    g = torch.Generator().manual_seed(12)
    z = (torch.rand(8, C, generator=g) * 100 - 50).float()
    z[0] = -50.0
    z[0, 0] = 50.0  # saturated and right
    z[1] = -50.0
    z[1, 1] = 50.0  # saturated and wrong (target 0 below)
    z[2] = 0.0  # uniform
    y = torch.randint(0, C, (8,), generator=g)
    y[0], y[1] = 0, 0
    return z, y


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_gradients_finite_for_extreme_logits(name):
    z, y = extreme_logits()
    loss = build_loss(name, C, **defaults_for(name))
    loss.set_epoch(140, 150)  # dal/sr with their late-training terms active
    z.requires_grad_(True)
    value = loss(z, y)
    value.backward()
    assert torch.isfinite(value), name
    assert torch.isfinite(z.grad).all(), name


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_half_precision_under_autocast(name):
    z, y = batch(13)
    zb = z.to(torch.bfloat16).requires_grad_(True)
    loss = build_loss(name, C, **defaults_for(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(zb, y)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(zb.detach().float(), y))  # computed in float32 internally
    value.backward()
    assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()


def test_int32_targets_accepted():
    z, y = batch(14)
    loss = build_loss("gce", C)
    torch.testing.assert_close(loss(z.float(), y.int()), loss(z.float(), y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_cuda_matches_cpu(name):
    z, y = batch(15)
    loss = build_loss(name, C, **defaults_for(name))
    loss.set_epoch(100, 150)
    cpu = loss(z.float(), y)
    with torch.autocast("cuda", dtype=torch.float16):
        gpu = loss(z.float().cuda().half(), y.cuda())  # the loss module itself stays on the CPU
    torch.testing.assert_close(gpu.cpu(), loss(z.float().half().float(), y), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(cpu)


# ---- validation -------------------------------------------------------------------------------
def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown loss 'agcee'.*agce.*nce\+agce"):
        build_loss("agcee", C)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("agcee", C, preset="cifar10")


def test_unknown_params_named_with_accepted():
    with pytest.raises(ValueError, match=r"agce: unknown parameter\(s\) alpha, qq; accepted: a, q"):
        build_loss("agce", C, qq=1, alpha=2)
    with pytest.raises(ValueError, match=r"accepted: \(none\)"):
        build_loss("ce", C, gamma=1)


@pytest.mark.parametrize(
    "name, params, pattern",
    [
        ("gce", {"q": 0}, r"gce: parameter 'q' must be .*> 0"),
        ("gce", {"q": -0.5}, r"'q' must be .*> 0"),
        ("agce", {"a": 0}, r"agce: parameter 'a' must be .*> 0"),
        ("agce", {"q": 0}, r"'q' must be .*> 0"),
        ("aul", {"a": 1.0}, r"aul: parameter 'a' must be .*> 1"),
        ("aul", {"a": 0.5}, r"'a' must be .*> 1"),
        ("nce+aul", {"a": 1.0}, r"nce\+aul: parameter 'a' must be .*> 1"),
        ("ael", {"a": -1}, r"ael: parameter 'a' must be .*> 0"),
        ("nce+ael", {"a": 0}, r"'a' must be .*> 0"),
        ("sce", {"alpha": -1}, r"sce: parameter 'alpha' must be .*>= 0"),
        ("nce+agce", {"beta": -0.1}, r"parameter 'beta' must be .*>= 0"),
        ("nce+rce", {"alpha": 0, "beta": 0}, r"both 0"),
        ("focal", {"gamma": -1}, r"'gamma' must be .*>= 0"),
        ("nfl+rce", {"gamma": float("nan")}, r"'gamma' must be a finite number"),
        ("agce", {"a": True}, r"'a' must be a finite number"),
        ("agce", {"a": "6"}, r"'a' must be a finite number"),
        ("dal", {"q_start": 0}, r"'q_start' must be .*> 0"),
        ("dal", {"q_end": 1.0}, r"'q_end' must be .*> 1"),
        ("dal", {"q_start": 1.2, "q_end": 1.1}, r"'q_end' must be > q_start=1.2"),
        ("sr", {"tau": 0}, r"sr: parameter 'tau' must be .*> 0"),
        ("sr", {"p": 0}, r"'p' must be .*> 0 and <= 1"),
        ("sr", {"p": 1.5}, r"'p' must be .*<= 1"),
        ("sr", {"lam": -1}, r"'lam' must be .*>= 0"),
        ("sr", {"rho": 0}, r"'rho' must be .*> 0"),
        ("sr", {"base": "sr"}, r"'base' must be a registered loss other than 'sr'.*valid: .*gce"),
        ("sr", {"base": "nope"}, r"'base' must be a registered loss"),
        ("sr", {"base": "gce", "base_params": {"qq": 1}}, r"gce: unknown parameter\(s\) qq"),
        ("logit_adjusted", {"class_counts": COUNTS, "tau": 0}, r"logit_adjusted: parameter 'tau' must be .*> 0"),
        ("ldam", {"class_counts": COUNTS, "s": 0}, r"'s' must be .*> 0"),
        ("ldam", {"class_counts": COUNTS, "max_margin": -1}, r"'max_margin' must be .*> 0"),
        ("ldam", {}, r"ldam: parameter 'class_counts' is required"),
        (
            "ldam",
            {"class_counts": [5] * (C - 1)},
            r"'class_counts' must have one count per class, length num_classes=10",
        ),
        ("logit_adjusted", {"class_counts": [5] * (C - 1) + [0]}, r"'class_counts' must be > 0 .*classes \[9\]"),
        ("balanced_softmax", {"class_counts": "abc"}, r"'class_counts' must be a sequence of numbers"),
    ],
)
def test_bad_values_raise(name, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_loss(name, C, **params)


@pytest.mark.parametrize("num_classes", [1, 0, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        build_loss("ce", num_classes)


def test_bad_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'imagenet'; valid presets: cifar10, cifar100"):
        build_loss("agce", C, preset="imagenet")
    with pytest.raises(
        ValueError, match=r"preset 'webvision' has no parameters for loss 'aul'; it covers: ce, dal, sr"
    ):
        build_loss("aul", C, preset="webvision")


def test_bad_inputs_and_epochs():
    loss = build_loss("gce", C)
    z, y = batch(16)
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, 10\)"):
        loss(z[:, :5].float(), y)
    with pytest.raises(ValueError, match=r"target must have shape \(32,\)"):
        loss(z.float(), y[:5])
    with pytest.raises(ValueError, match="integer class indices"):
        loss(z.float(), y.float())
    with pytest.raises(ValueError, match="epoch must be in"):
        loss.set_epoch(11, 10)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        loss.set_epoch(-1, 10)
    with pytest.raises(ValueError, match="total_epochs must be an integer >= 1"):
        build_loss("dal", C).set_epoch(0, 0)
