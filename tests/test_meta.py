"""The bi-level step: functional SGD, meta-gradient against finite differences, descent, BN, intervals."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dynloss.dynamic import DynamicLoss
from dynloss.engine import MetaSettings, train_one_epoch
from dynloss.meta import MetaBatch, meta_step, sgd_virtual_step
from dynloss.models import build_model
from dynloss.models.classifier import Classifier

C = 3


def tiny_model(bn: bool = False, dtype=torch.float64) -> Classifier:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh()]
    return Classifier(nn.Sequential(*layers), 6, C).to(dtype)


def toy_batch(n=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randint(0, C, (n,), generator=g)
    r = torch.randint(0, 100, (n,), generator=g)
    return x, y, r


@pytest.mark.parametrize("momentum, nesterov, wd", [(0.0, False, 0.0), (0.9, False, 5e-4), (0.9, True, 1e-3)])
def test_virtual_step_equals_the_optimizers_real_step(momentum, nesterov, wd):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    x, y, _ = toy_batch()
    for _ in range(2):  # a second step exercises the momentum buffer
        params = list(model.parameters())
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        virtual = [v.detach().clone() for v in sgd_virtual_step(opt, params, grads)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for v, p in zip(virtual, model.parameters()):
            assert torch.allclose(v, p, atol=1e-12)


def reference_meta_loss(model, dyn, lr, wd, x, y, r, xm, ym, scope):
    """Written out independently: one SGD step (no momentum yet) of L_dyn, then CE on the meta batch."""
    params = dict(model.named_parameters())
    logits, feats = functional_call(model, params, (x,), {"return_features": True})
    pseudo = logits.detach().softmax(1)
    w = dyn.corrector.trust(r, y)
    target = w[:, None] * F.one_hot(y, C) + (1 - w[:, None]) * pseudo
    if scope == "head":
        names = ["fc.weight", "fc.bias"]
        logits = F.linear(feats.detach(), params["fc.weight"], params["fc.bias"])
    else:
        names = list(params)
    loss = -(target * F.log_softmax(logits + dyn.margins(), 1)).sum(1).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    new = dict(params)
    new.update({n: params[n] - lr * (g + wd * params[n]) for n, g in zip(names, grads)})
    return F.cross_entropy(functional_call(model, new, (xm,)), ym)


@pytest.mark.parametrize("scope, meta_grad", [("full", "jvp"), ("full", "double_backward"), ("head", "jvp")])
def test_meta_gradient_matches_finite_differences(scope, meta_grad):
    model = tiny_model()
    torch.manual_seed(1)
    dyn = DynamicLoss(C).double()
    with torch.no_grad():  # move off the saturated start so every coordinate has a visible gradient
        dyn.corrector.mlp[-1].bias.fill_(0.3)
    x, y, r = toy_batch(seed=2)
    xm, ym, _ = toy_batch(n=12, seed=3)
    lr, wd = 0.5, 1e-3
    probes = [(dyn.corrector.mlp[-1].bias, i) for i in range(C)] + [(dyn.margins.code, (0, j)) for j in range(3)]
    eps = 1e-6
    fd = []
    for p, i in probes:
        with torch.no_grad():
            p[i] += eps
        up = reference_meta_loss(model, dyn, lr, wd, x, y, r, xm, ym, scope).item()
        with torch.no_grad():
            p[i] -= 2 * eps
        down = reference_meta_loss(model, dyn, lr, wd, x, y, r, xm, ym, scope).item()
        with torch.no_grad():
            p[i] += eps
        fd.append((up - down) / (2 * eps))
    before = [p[i].item() for p, i in probes]
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    meta_opt = torch.optim.SGD(dyn.parameters(), lr=1.0)  # so the change of phi is minus its gradient
    meta_step(model, dyn, opt, meta_opt, x, y, r, MetaBatch(xm, ym), scope=scope, mix="softmax", meta_grad=meta_grad)
    autograd = [before[k] - p[i].item() for k, (p, i) in enumerate(probes)]
    assert max(abs(a) for a in fd) > 1e-5, "probes must carry signal for the comparison to mean anything"
    for a, b in zip(autograd, fd):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-9)


def _conv_problem(n: int, m: int):
    """A small conv net with batch norm (float64), a Dynamic Loss off its saturated start and off its zero last
    layer (every part of phi matters), n training and m meta images of 8x8."""
    torch.manual_seed(0)
    state = build_model("small_cnn", C, in_chans=1).double().state_dict()
    dyn = DynamicLoss(C, margin_prior="log_prior", class_counts=[50, 20, 5]).double()
    with torch.no_grad():
        dyn.corrector.mlp[-1].bias.fill_(0.3)
        dyn.margins.mlp[-1].weight.normal_(0, 0.1)
    g = torch.Generator().manual_seed(4)
    x, xm = (torch.randn(k, 1, 8, 8, generator=g, dtype=torch.float64) for k in (n, m))
    y, ym, r = torch.randint(0, C, (n,), generator=g), torch.randint(0, C, (m,), generator=g), \
        torch.randint(0, 100, (n,), generator=g)
    return state, dyn.state_dict(), (x, y, r, xm, ym)


def _phi_step(problem, meta_grad, opt_kwargs, groups=False, warm_steps=0):
    """phi's change (= minus its meta-gradient) after one meta step from the problem's states, and the model."""
    model_state, dyn_state, (x, y, r, xm, ym) = problem
    model = build_model("small_cnn", C, in_chans=1).double()
    model.load_state_dict(model_state)
    dyn = DynamicLoss(C, margin_prior="log_prior", class_counts=[50, 20, 5]).double()
    dyn.load_state_dict(dyn_state)
    head = list(model.fc.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    params = [{"params": body}, {"params": head, "lr": 0.03}] if groups else model.parameters()
    opt = torch.optim.SGD(params, lr=0.1, **opt_kwargs)
    for _ in range(warm_steps):  # momentum buffers and moved BN statistics
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    before = [p.detach().clone() for p in dyn.parameters()]
    meta_step(model, dyn, opt, torch.optim.SGD(dyn.parameters(), lr=1.0), x, y, r, MetaBatch(xm, ym),
              mix="softmax", meta_grad=meta_grad)
    return torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, dyn.parameters())]), model


@pytest.mark.parametrize("opt_kwargs, groups, warm_steps", [
    ({}, False, 0),
    ({"momentum": 0.9, "weight_decay": 5e-4}, False, 0),
    ({"momentum": 0.9, "weight_decay": 5e-4}, True, 2),
    ({"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, True, 1),
    ({"momentum": 0.8, "dampening": 0.3}, False, 1),
])
def test_jvp_meta_gradient_equals_the_double_backward(opt_kwargs, groups, warm_steps):
    """The logit-level JVP meta-gradient against the second-order graph through a conv net with batch norm:
    SGD with and without momentum buffers, nesterov, dampening, weight decay, two param groups' lrs."""
    problem = _conv_problem(12, 6)
    jvp, m1 = _phi_step(problem, "jvp", opt_kwargs, groups, warm_steps)
    ref, m2 = _phi_step(problem, "double_backward", opt_kwargs, groups, warm_steps)
    assert ref.abs().max() > 1e-6
    assert torch.allclose(jvp, ref, rtol=1e-7, atol=1e-12), (jvp - ref).abs().max()
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):  # the same actual step after it
        assert torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-12), n


def test_finite_difference_meta_gradient_is_close_to_the_exact_one():
    """The cheap option: a central difference of the logits instead of the JVP, within 1% of the exact
    meta-gradient (its step is FD_STEP of the virtual move; ReLU kinks make the error first order in it)."""
    problem, kwargs = _conv_problem(32, 16), {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    exact, _ = _phi_step(problem, "jvp", kwargs, warm_steps=2)
    approx, _ = _phi_step(problem, "finite_difference", kwargs, warm_steps=2)
    assert exact.abs().max() > 1e-6
    assert (approx - exact).norm() < 1e-2 * exact.norm()


def test_meta_update_lowers_the_meta_loss_on_a_toy_problem():
    """Two separable classes, half the training labels flipped, a clean meta set: a meta step moves phi so
    that the lookahead meta loss (virtual step, then CE on the meta batch) goes down, step after step."""
    torch.manual_seed(0)
    n = 64
    x = torch.randn(n, 4, dtype=torch.float64)
    true = (x[:, 0] > 0).long()
    flipped = torch.arange(n) % 2 == 0
    y = torch.where(flipped, 1 - true, true)
    r = torch.where(flipped, torch.tensor(90), torch.tensor(10))  # noisy samples rank high in their class
    xm = torch.randn(32, 4, dtype=torch.float64)
    ym = (xm[:, 0] > 0).long()
    model = tiny_model()
    dyn = DynamicLoss(C).double()
    meta_opt = torch.optim.SGD(dyn.parameters(), lr=1.0)
    losses = [reference_meta_loss(model, dyn, 0.5, 0.0, x, y, r, xm, ym, "full").item()]
    for _ in range(5):
        probe = copy.deepcopy(model)  # same classifier every time: only phi changes
        meta_step(probe, dyn, torch.optim.SGD(probe.parameters(), lr=0.5), meta_opt, x, y, r,
                  MetaBatch(xm, ym), mix="softmax")
        losses.append(reference_meta_loss(model, dyn, 0.5, 0.0, x, y, r, xm, ym, "full").item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_only_the_actual_step_moves_batch_norm_statistics():
    model = tiny_model(bn=True)
    twin = copy.deepcopy(model)
    x, y, r = toy_batch()
    xm, ym, _ = toy_batch(n=8, seed=5)
    dyn = DynamicLoss(C).double()
    meta_step(model, dyn, torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(dyn.parameters()),
              x, y, r, MetaBatch(xm, ym))
    twin(x)  # exactly one training-mode forward of the batch
    for (name, b), b2 in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(b, b2), name


def test_no_meta_batch_means_no_change_to_phi():
    model = tiny_model()
    dyn = DynamicLoss(C).double()
    before = [p.detach().clone() for p in dyn.parameters()]
    x, y, r = toy_batch()
    out = meta_step(model, dyn, torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(dyn.parameters()),
                    x, y, r, None)
    assert "meta/loss" not in out and "train/loss" in out
    assert all(torch.equal(a, b) for a, b in zip(before, dyn.parameters()))


def test_meta_interval_runs_a_meta_step_every_k_iterations():
    model = tiny_model()
    dyn = DynamicLoss(C).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta_opt = torch.optim.Adam(dyn.parameters())
    batches = [dict(zip(("x", "label"), toy_batch(seed=s)[:2]), id=torch.arange(16)) for s in range(10)]
    meta_calls = []

    def meta_batches():
        while True:
            meta_calls.append(1)
            x, y, _ = toy_batch(n=8, seed=99)
            yield {"x": x, "label": y}

    stats, it = train_one_epoch(model, opt, batches, epoch=1, dyn=dyn, meta_optimizer=meta_opt,
                                settings=MetaSettings(meta_interval=4, warmup_epochs=1),
                                rank_table=torch.zeros(16, dtype=torch.long), meta_batches=meta_batches())
    assert it == 10 and len(meta_calls) == 3  # iterations 0, 4, 8
    assert {"train/loss", "train/acc", "train/trust", "meta/loss"} <= set(stats)


def test_warmup_epochs_are_plain_cross_entropy():
    model = tiny_model()
    dyn = DynamicLoss(C).double()
    before = [p.detach().clone() for p in dyn.parameters()]
    batches = [dict(zip(("x", "label"), toy_batch(seed=s)[:2]), id=torch.arange(16)) for s in range(3)]
    stats, _ = train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, epoch=0, dyn=dyn,
                               meta_optimizer=torch.optim.Adam(dyn.parameters()),
                               settings=MetaSettings(warmup_epochs=2), meta_batches=None)
    assert "meta/loss" not in stats
    assert all(torch.equal(a, b) for a, b in zip(before, dyn.parameters()))


def test_bad_scope_is_rejected():
    model = tiny_model()
    x, y, r = toy_batch()
    dyn = DynamicLoss(C).double()
    with pytest.raises(ValueError, match="scope"):
        meta_step(model, dyn, torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(dyn.parameters()),
                  x, y, r, MetaBatch(x, y), scope="middle")


def test_corrector_pretraining_raises_trust_then_leaves_the_meta_optimizer_fresh():
    model = tiny_model()
    dyn = DynamicLoss(C).double()
    meta_opt = torch.optim.Adam(dyn.parameters(), lr=1e-2)
    batches = [dict(zip(("x", "label"), toy_batch(seed=s)[:2]), id=torch.arange(16)) for s in range(5)]
    ranks = torch.zeros(16, dtype=torch.long)
    before = dyn.corrector.trust(ranks, batches[0]["label"]).mean().item()
    stats, _ = train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), batches[:2], epoch=0, dyn=dyn,
                               meta_optimizer=meta_opt, rank_table=ranks,
                               settings=MetaSettings(warmup_epochs=2, corrector_pretrain_iters=3))
    assert "meta/pretrain_loss" in stats and len(meta_opt.state) > 0  # still pre-training: moments kept
    train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), batches[2:], epoch=1, dyn=dyn,
                    meta_optimizer=meta_opt, rank_table=ranks, iteration=2,
                    settings=MetaSettings(warmup_epochs=2, corrector_pretrain_iters=3))
    assert dyn.corrector.trust(ranks, batches[0]["label"]).mean().item() > before
    assert len(meta_opt.state) == 0  # reset right after the last pre-training step (iteration 2), mid-epoch
