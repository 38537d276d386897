"""The bi-level meta step of Dynamic Loss, as library functions the training loops call.

Source: Jiang et al., "Dynamic Loss For Robust Learning" (TPAMI 2023), Algorithm 1, and the authors' code
(DESIGN.md section 3): a differentiable *virtual* step of the classifier's own SGD, a meta loss of the
virtually-updated classifier on a meta batch, backpropagated into the label corrector and margin generator
(phi), then the *actual* step with the updated phi.

Scopes:
  ``full``  the meta-gradient through every classifier parameter (the authors' method). By default
            (``meta_grad="jvp"``) it is computed exactly at the logits with one Jacobian-vector product
            instead of a second-order graph through the network (``_jvp_meta_objective``; the JVP read off the
            first forward's graph by ``dynloss.graph_jvp``; docs/performance.md has the cost of each);
            ``meta_grad="double_backward"`` is the authors' way;
  ``head``  the virtual step moves only the final linear layer on detached features (the cheap variant).

Departures from the authors' code, all to save work on the hot path and each a documented choice:
  * the virtual and the actual step share one forward pass of the batch (the actual step's view), instead
    of a separate weak-view forward for the virtual step;
  * batch-norm buffers are cloned for the virtual/meta forwards, so only the actual step moves the
    running statistics (the virtual passes otherwise update them twice per iteration).

DDP: ``virtual_grad_hook`` receives the virtual gradients (and, for ``jvp``, the meta loss's gradient at
theta') and must return them averaged across workers *differentiably*
(``torch.distributed.nn.functional.all_reduce``); ``meta_grad_hook`` averages phi's
gradients in place. The actual step's backward goes through whatever ``model`` is (a DDP wrapper syncs it).
No host syncs: every returned statistic is a detached tensor.

    python -m pytest tests/test_meta.py -q
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dynloss import graph_jvp
from dynloss.dynamic import DynamicLoss, soft_cross_entropy

SCOPES = ("full", "head")
PSEUDO_FROM = ("logits", "adjusted")
META_GRADS = ("jvp", "finite_difference", "double_backward")
GradHook = Callable[[Sequence[Tensor]], Sequence[Tensor]]


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP / compile wrapper (functional calls need the plain module)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def forward_with_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, pooled features) through ``model`` (DDP-wrapped or not); see dynloss.models.Classifier."""
    return model(x, return_features=True)


def _by_group(optimizer: torch.optim.SGD, params: Sequence[Tensor]) -> list[tuple[dict, list[int]]]:
    """(param group, positions in ``params``) for every group that holds some of ``params``."""
    where = {id(p): k for k, g in enumerate(optimizer.param_groups) for p in g["params"]}
    slots: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        slots.setdefault(where[id(p)], []).append(i)
    return [(optimizer.param_groups[k], idx) for k, idx in slots.items()]


def _grad_factor(optimizer: torch.optim.SGD, group: dict, p: Tensor) -> float:
    """The factor torch SGD puts on this step's gradient inside the update direction (lr aside)."""
    mu = group["momentum"]
    if not mu:
        return 1.0
    first = optimizer.state.get(p, {}).get("momentum_buffer") is None  # torch starts the buffer at d itself
    factor = 1.0 if first else 1.0 - group["dampening"]
    return 1.0 + mu * factor if group["nesterov"] else factor


def sgd_virtual_step(optimizer: torch.optim.SGD, params: Sequence[Tensor], grads: Sequence[Tensor]
                     ) -> list[Tensor]:
    """theta' = one step of ``optimizer`` (torch SGD semantics) as a differentiable function of ``grads``.

    Reads lr, momentum, dampening, weight decay and nesterov from each parameter's group (the current
    scheduled lr) and its momentum buffer from the optimizer state; changes nothing. Multi-tensor
    (``torch._foreach_*``) ops per param group: a handful of kernels, not a few per parameter.
    """
    out: list[Tensor | None] = [None] * len(params)
    for grp, idx in _by_group(optimizer, params):
        ps, d = [params[i] for i in idx], [grads[i] for i in idx]
        if grp["weight_decay"]:
            d = torch._foreach_add(d, ps, alpha=grp["weight_decay"])
        mu = grp["momentum"]
        if mu:
            bufs = [optimizer.state.get(p, {}).get("momentum_buffer") for p in ps]
            if any(b is None for b in bufs):  # the first step: torch starts each buffer at d itself
                buf = [di if b is None else mu * b + (1 - grp["dampening"]) * di for b, di in zip(bufs, d)]
            else:
                buf = torch._foreach_add(torch._foreach_mul(bufs, mu), d, alpha=1 - grp["dampening"])
            d = torch._foreach_add(d, buf, alpha=mu) if grp["nesterov"] else buf
        for i, v in zip(idx, torch._foreach_add(ps, d, alpha=-grp["lr"])):
            out[i] = v
    return out  # type: ignore[return-value]


def effective_lrs(optimizer: torch.optim.SGD, params: Sequence[Tensor]) -> list[float]:
    """d theta'/d g per parameter: the scheduled lr times the factor momentum's dampening and nesterov put on
    this step's gradient (the momentum buffer and weight decay add terms that do not depend on g)."""
    out = [0.0] * len(params)
    for grp, idx in _by_group(optimizer, params):
        for i in idx:
            out[i] = grp["lr"] * _grad_factor(optimizer, grp, params[i])
    return out


def _cloned_buffers(module: nn.Module) -> dict[str, Tensor]:
    return {n: b.clone() for n, b in module.named_buffers()}


@dataclass
class MetaBatch:
    x: Tensor
    y: Tensor


def _trainable(inner: nn.Module) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """(names, parameters) of every parameter the classifier trains: what the full scope's virtual step moves."""
    return tuple(zip(*[(n, p) for n, p in inner.named_parameters() if p.requires_grad]))  # type: ignore[return-value]


def _lookahead_meta_loss(inner: nn.Module, dyn: DynamicLoss, optimizer: torch.optim.SGD, logits: Tensor,
                         feats: Tensor, labels: Tensor, ranks: Tensor, pseudo: Tensor, meta: MetaBatch, scope: str,
                         virtual_grad_hook: GradHook | None) -> Tensor:
    """Meta loss of theta'(phi) on the meta batch, differentiable in phi through the virtual step's graph."""
    if scope == "full":
        names, params = _trainable(inner)
        v_logits = logits
    else:
        names, params = ("weight", "bias"), (inner.fc.weight, inner.fc.bias)
        v_logits = F.linear(feats.detach(), *params)
    v_loss = dyn(v_logits, labels, ranks, pseudo=pseudo).loss
    grads = torch.autograd.grad(v_loss, params, create_graph=True, retain_graph=True)
    if virtual_grad_hook is not None:
        grads = virtual_grad_hook(grads)
    new_params = dict(zip(names, sgd_virtual_step(optimizer, params, grads)))
    if scope == "full":
        m_logits = functional_call(inner, {**_cloned_buffers(inner), **new_params}, (meta.x,))
    else:
        with torch.no_grad():
            _, m_feats = functional_call(inner, _cloned_buffers(inner), (meta.x,), {"return_features": True})
        m_logits = F.linear(m_feats, new_params["weight"], new_params["bias"])
    return F.cross_entropy(m_logits.float(), meta.y)


def _jvp_meta_objective(inner: nn.Module, dyn: DynamicLoss, optimizer: torch.optim.SGD, logits: Tensor, x: Tensor,
                        labels: Tensor, ranks: Tensor, pseudo: Tensor, meta: MetaBatch,
                        virtual_grad_hook: GradHook | None, exact: bool = True) -> tuple[Tensor, Tensor]:
    """(meta loss, an objective whose gradient in phi is the exact meta-gradient), without a second-order graph.

    phi reaches theta' = theta - lr_eff * grad_theta L(z(theta), phi) + (terms free of phi) only through L's
    dependence at the logits z. With g' the meta loss's gradient at theta' (one forward/backward of the meta
    batch, no graph kept) and u = J_theta(z) (lr_eff * g') (the logits' change along that direction, batch norm
    in train mode as in the step: ``_logit_jvp``, tangent arithmetic on the first forward's saved activations),
    the chain rule gives
    d meta / d phi = -grad_phi <grad_z L(z, phi), u>: a logit-level double backward, B x C numbers.
    DDP: theta' takes the averaged virtual gradient, u the averaged g' (the same hook averages both), and
    ``meta_grad_hook`` then averages phi's gradients: the mean meta loss's exact gradient. Dropout (vgg19_bn's
    classifier) keeps the forward's masks in u, except where ``_logit_jvp`` falls back to the forward mode.

    ``exact=False`` (``meta_grad="finite_difference"``) replaces the JVP by two no-grad forwards: a central
    difference of the logits along lr_eff * g' (``_logit_difference``; DARTS approximates its Hessian-vector
    product the same way; dropout draws new masks in each). A one-sided difference over the whole virtual
    step (one forward) was tried and is not close enough: the logits are far from linear over a step.
    """
    names, params = _trainable(inner)
    grads = torch.autograd.grad(dyn(logits, labels, ranks, pseudo=pseudo).loss, params, retain_graph=True)
    if virtual_grad_hook is not None:
        grads = [g.detach() for g in virtual_grad_hook(grads)]
    with torch.no_grad():
        theta1 = [t.requires_grad_() for t in sgd_virtual_step(optimizer, params, grads)]
    m_loss = F.cross_entropy(functional_call(inner, {**_cloned_buffers(inner), **dict(zip(names, theta1))},
                                             (meta.x,)).float(), meta.y)
    g_meta = torch.autograd.grad(m_loss, theta1)
    if virtual_grad_hook is not None:
        g_meta = [g.detach() for g in virtual_grad_hook(g_meta)]
    tangents = torch._foreach_mul(g_meta, effective_lrs(optimizer, params))
    if exact:
        u = _logit_jvp(inner, names, params, tangents, x, logits)
    else:
        u = _logit_difference(inner, names, params, tangents, x)
    z = logits.detach().float().requires_grad_()
    dz, = torch.autograd.grad(dyn(z, labels, ranks, pseudo=pseudo).loss, z, create_graph=True)
    return m_loss, -(dz * u.float()).sum()


_GRAPH_JVP_CHECKED: dict[tuple, bool] = {}  # (node types, device, dtype) -> graph_jvp agreed with the forward mode
_AGREE = {torch.float64: 1e-8, torch.float32: 1e-3}  # relative difference allowed; 5e-2 for a 16-bit model


def forward_mode_jvp(inner: nn.Module, names: Sequence[str], params: Sequence[Tensor], tangents: Sequence[Tensor],
                      x: Tensor) -> Tensor:
    """J_theta(z) tangents by torch's forward mode: primal and tangent recomputed, batch norm on cloned buffers."""
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach(), t) for n, p, t in zip(names, params, tangents)}
        return fwAD.unpack_dual(functional_call(inner, {**_cloned_buffers(inner), **duals}, (x,))).tangent


def _logit_jvp(inner: nn.Module, names: Sequence[str], params: Sequence[Tensor], tangents: Sequence[Tensor],
               x: Tensor, logits: Tensor) -> Tensor:
    """u = J_theta(z) tangents, read off the first forward's graph (``dynloss.graph_jvp``: the tangent arithmetic
    only, ~2 forward units against the forward mode's ~2.5-3.5) where every node of it has a rule, else by torch's
    forward mode (which draws new dropout masks; the graph reuses the forward's).

    A graph with a node whose rule the test suite cannot run on a CPU (``graph_jvp.UNVERIFIED``: cudnn's batch
    norm) is checked once per kind (node types, device, dtype) and process against the forward mode
    (``_graph_jvp_error``); if the two differ beyond rounding (``_AGREE``) that kind uses the forward mode from then
    on, with a warning. The check's comparison is the step's one host sync, once per kind."""
    try:
        types = graph_jvp.node_types(logits)
        key = (types, logits.device.type, logits.dtype)
        if _GRAPH_JVP_CHECKED.get(key) is False:
            return forward_mode_jvp(inner, names, params, tangents, x)
        u = graph_jvp.graph_jvp(logits, dict(zip(params, tangents)))
    except graph_jvp.Unsupported as e:  # Python shows a warning once per message: once per model kind
        warnings.warn(f"the meta step's JVP runs torch's forward mode (~2x the cost): {e}", RuntimeWarning,
                      stacklevel=2)
        return forward_mode_jvp(inner, names, params, tangents, x)
    if key in _GRAPH_JVP_CHECKED or not graph_jvp.UNVERIFIED.intersection(types):
        return u
    err, ref = _graph_jvp_error(inner, names, params, tangents, x)
    _GRAPH_JVP_CHECKED[key] = err < _AGREE.get(ref.dtype, 5e-2)
    if _GRAPH_JVP_CHECKED[key]:
        return u
    warnings.warn(f"dynloss.graph_jvp differs from torch's forward mode by {err:.3g} (relative) on this "
                  f"model/device; the meta step uses the forward mode for it", RuntimeWarning, stacklevel=2)
    return ref


def _graph_jvp_error(inner: nn.Module, names: Sequence[str], params: Sequence[Tensor], tangents: Sequence[Tensor],
                     x: Tensor) -> tuple[float, Tensor]:
    """(relative difference of ``graph_jvp`` from the forward mode, the forward mode's u) on a new forward of ``x``
    (batch norm on cloned buffers), both passes starting from the same RNG state so that dropout draws the same
    masks in each; the RNG is left as it was. Autocast is off: in the parameters' precision the two agree to its
    rounding (a wrong rule is off by O(1)), while under bfloat16 they differ by ~2% on ResNet-32 already, a margin
    that deeper networks could exceed."""
    cuda = x.device.type == "cuda"
    with torch.random.fork_rng(devices=[x.device] if cuda else []), torch.autocast(x.device.type, enabled=False):
        state = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if cuda else None
        u = graph_jvp.graph_jvp(functional_call(inner, _cloned_buffers(inner), (x,)), dict(zip(params, tangents)))
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], x.device)
        ref = forward_mode_jvp(inner, names, params, tangents, x)
    return float((u.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)), ref


FD_STEP = 1e-4  # the central difference's step, as a fraction of the virtual step's move lr_eff * g'


@torch.no_grad()
def _logit_difference(inner: nn.Module, names: Sequence[str], params: Sequence[Tensor], tangents: Sequence[Tensor],
                      x: Tensor) -> Tensor:
    """J_theta(z) tangents ~ (z(theta + h t) - z(theta - h t)) / 2h, h = FD_STEP: two no-grad forwards, batch norm in
    train mode on cloned buffers, in float32 (under bfloat16 autocast the difference would be rounding)."""
    base = [p.detach() for p in params]
    x = x.to(base[0].dtype)  # the parameters' own precision (autocast off below)
    with torch.autocast(x.device.type, enabled=False):
        up, down = (functional_call(inner, {**_cloned_buffers(inner),
                                            **dict(zip(names, torch._foreach_add(base, tangents, alpha=sign * FD_STEP)))},
                                    (x,)) for sign in (1.0, -1.0))
    return (up.float() - down.float()) / (2 * FD_STEP)


def meta_step(model: nn.Module, dyn: DynamicLoss, optimizer: torch.optim.SGD,
              meta_optimizer: torch.optim.Optimizer, x: Tensor, labels: Tensor, ranks: Tensor,
              meta: MetaBatch | None, *, scope: str = "full", mix: str = "gumbel", pseudo_from: str = "logits",
              virtual_grad_hook: GradHook | None = None, meta_grad_hook: Callable[[list[Tensor]], None] | None = None,
              max_grad_norm: float | None = None, meta_grad: str = "jvp") -> dict[str, Tensor]:
    """One iteration of Algorithm 1: virtual step, meta step on ``meta`` (skipped when None), actual step.

    ``pseudo_from``: the pseudo-labels p~ are drawn from the plain logits z (``"logits"``, the authors') or from
    the margin-adjusted z + m (``"adjusted"``) that the loss fits, i.e. the classifier's estimate of the
    training (long-tailed) label distribution.

    ``meta_grad`` (scope ``full``): ``"jvp"`` computes the exact meta-gradient at the logits with one
    Jacobian-vector product (``_jvp_meta_objective``); ``"double_backward"`` differentiates through the
    virtual step's whole second-order graph (the authors' way, the reference the tests compare against).
    Both give the same gradient to float tolerance. ``"finite_difference"`` replaces the JVP by a difference of
    logits (cheaper, approximate: docs/performance.md). ``head`` always differentiates through its one layer.

    Returns detached tensors: ``train/loss``, ``meta/loss`` (when a meta step ran), ``trust`` (B,),
    ``logits`` (B, C).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if meta_grad not in META_GRADS:
        raise ValueError(f"meta_grad must be one of {META_GRADS}, got {meta_grad!r}")
    if pseudo_from not in PSEUDO_FROM:
        raise ValueError(f"pseudo_from must be one of {PSEUDO_FROM}, got {pseudo_from!r}")
    inner = unwrap(model)
    logits, feats = forward_with_features(model, x)
    if pseudo_from == "adjusted":
        with torch.no_grad():
            pseudo = dyn.pseudo_labels(logits.float() + dyn.margins(), mix)
    else:
        pseudo = dyn.pseudo_labels(logits, mix)
    stats: dict[str, Tensor] = {}

    if meta is not None:
        phi = [p for p in dyn.parameters() if p.requires_grad]
        if scope == "full" and meta_grad != "double_backward":
            m_loss, objective = _jvp_meta_objective(inner, dyn, optimizer, logits, x, labels, ranks, pseudo, meta,
                                                    virtual_grad_hook, exact=meta_grad == "jvp")
        else:
            m_loss = objective = _lookahead_meta_loss(inner, dyn, optimizer, logits, feats, labels, ranks, pseudo,
                                                      meta, scope, virtual_grad_hook)
        meta_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(phi, torch.autograd.grad(objective, phi, allow_unused=True)):
            p.grad = torch.zeros_like(p) if g is None else g
        if meta_grad_hook is not None:
            meta_grad_hook([p.grad for p in phi])
        meta_optimizer.step()
        stats["meta/loss"] = m_loss.detach()

    # 3. actual step with the updated phi (no grad into phi)
    with torch.no_grad():
        w, target = dyn.corrected_target(labels, ranks, pseudo)
        margins = dyn.margins()
    loss = soft_cross_entropy(logits.float() + margins, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        nn.utils.clip_grad_norm_(inner.parameters(), max_grad_norm)
    optimizer.step()
    stats.update({"train/loss": loss.detach(), "trust": w.detach(), "logits": logits.detach()})
    return stats


def ce_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, labels: Tensor,
            criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
            margins: Tensor | None = None, max_grad_norm: float | None = None) -> dict[str, Tensor]:
    """A plain supervised step: warm-up (CE), the robust-loss baselines, and the meta-set fine-tune
    (``margins`` from the generator, no grad, added to the logits as in the authors' fine-tune pass)."""
    logits = model(x)
    z = logits.float() if margins is None else logits.float() + margins
    loss = (criterion or F.cross_entropy)(z, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_grad_norm)
    optimizer.step()
    return {"train/loss": loss.detach(), "logits": logits.detach()}


def pretrain_corrector_step(dyn: DynamicLoss, meta_optimizer: torch.optim.Optimizer, labels: Tensor,
                            ranks: Tensor, logits: Tensor,
                            meta_grad_hook: Callable[[list[Tensor]], None] | None = None) -> Tensor:
    """Warm-up: train the corrector alone to reproduce the given label, ``-sum y log(y_hat + 1e-8)``.

    The authors run this for 2000 iterations; it drives the sigmoid into saturation (DESIGN.md section 8),
    so the engine bounds it and gives the meta optimizer fresh state afterwards.
    """
    pseudo = dyn.pseudo_labels(logits, "softmax")
    _, target = dyn.corrected_target(labels, ranks, pseudo)
    loss = -torch.log(target.gather(1, labels[:, None]) + 1e-8).mean()
    meta_optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=list(dyn.corrector.parameters()))
    if meta_grad_hook is not None:  # DDP: keep phi identical on every worker
        meta_grad_hook([p.grad for p in dyn.corrector.parameters()])
    meta_optimizer.step()
    return loss.detach()


def build_meta_optimizer(dyn: DynamicLoss, lr: float = 3e-3, margin_lr: float | None = None) -> torch.optim.Adam:
    """Adam on phi, no weight decay, fixed lr (authors' setting: one lr for both nets).

    ``margin_lr`` gives the margin generator its own lr (0 keeps the margins where they start, e.g. at logit
    adjustment): Adam normalises the generator's ~1e-4 meta-gradients to ~lr per step, so at the corrector's
    lr a few hundred steps move every margin by whole logits (docs/method.md).
    """
    margin_lr = lr if margin_lr is None else margin_lr
    groups = [{"params": list(dyn.corrector.parameters()), "lr": lr},
              {"params": list(dyn.margins.parameters()), "lr": margin_lr}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, weight_decay=0.0)
