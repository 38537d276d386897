"""dynloss.graph_jvp: the logits' JVP read off the first forward's autograd graph (the full scope's meta-gradient).

Against torch's forward mode on every registered model in train mode (float64 where the model is small, float32
for vgg19_bn and Inception-ResNet-v2), with channels_last and bfloat16 autocast (what a GPU run turns on) on the
CPU and, where there is one, on a GPU, the fallback for graphs with a node it has no rule for (or a rule that
refuses during the walk), and the guard that checks the first graph of a kind holding an unverified rule against the
forward mode. The GPU's own nodes: every rule's saved attributes against torch's declaration of its node types
(``torch._C._functions``), cudnn's batch norm rule run through that node's attribute names, the fused dropout
(``torch.native_dropout``, F.dropout on a GPU). The meta-gradient it gives is checked against the authors' double
backward in tests/test_meta.py.

    .venv/bin/python -m pytest tests/test_graph_jvp.py -q
"""
import inspect
import re
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from test_models import CASES
from torch import nn

import dynloss.graph_jvp as graph_jvp_module
from dynloss import meta
from dynloss.graph_jvp import RULES, UNVERIFIED, Unsupported, graph_jvp, node_types
from dynloss.models import build_model
from dynloss.models.classifier import Classifier


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()  # see tests/test_models.py: small forwards on a shared 2-core box
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_tf32():
    """TF32 off (float32 comparisons on a GPU), restored after. Plain assignments: ``torch.backends.cuda.matmul``
    is an object whose settings pytest's monkeypatch cannot undo (it deletes the attribute: AttributeError)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _jvp_both_ways(model: nn.Module, x: torch.Tensor, seed: int = 0):
    """(graph_jvp's u, forward mode's u) for random tangents on every trainable parameter; the RNG is reset
    before each pass so dropout draws the same masks in both."""
    names, params = meta._trainable(model)
    g = torch.Generator().manual_seed(seed)
    tangents = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    torch.manual_seed(1)
    z = model(x)
    torch.autograd.grad(z.sum(), params, retain_graph=True)  # as in the meta step: a backward has run first
    torch.manual_seed(1)
    ref = meta.forward_mode_jvp(model, names, params, tangents, x)
    return graph_jvp(z, dict(zip(params, tangents))), ref


@pytest.mark.parametrize("name", sorted(CASES))
def test_graph_jvp_equals_the_forward_mode_on_every_registered_model(name):
    in_chans, size, _ = CASES[name]
    dtype = torch.float32 if name in ("vgg19_bn", "inception_resnet_v2") else torch.float64
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_chans=in_chans).to(dtype).train()
    x = torch.randn(2, in_chans, size, size, dtype=dtype)
    u, ref = _jvp_both_ways(model, x)
    assert not u.requires_grad and u.shape == ref.shape == (2, 5)
    assert ref.abs().max() > 1e-3
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(u, ref, rtol=tol, atol=tol * float(ref.abs().max())), (u - ref).abs().max()


def test_an_mlp_with_tanh_sigmoid_and_batch_norm_1d():
    """The activations of the tests' tiny models (tests/test_meta.py, tests/test_distributed.py) and BatchNorm1d."""
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 6), nn.Sigmoid()),
                       6, 3).double().train()
    u, ref = _jvp_both_ways(model, torch.randn(16, 4, dtype=torch.float64))
    assert ref.abs().max() > 1e-3
    assert torch.allclose(u, ref, rtol=1e-10, atol=1e-12)


def _saved_reads(fn) -> set[str]:
    """The ``_saved_*`` attributes a rule's source reads, and those of the module's functions it calls."""
    src = inspect.getsource(fn)
    reads = set(re.findall(r"\b_saved_\w+", src))
    for name in set(re.findall(r"\b(_\w+)\(", src)):
        helper = getattr(graph_jvp_module, name, None)
        if inspect.isfunction(helper) and helper is not fn:
            reads |= set(re.findall(r"\b_saved_\w+", inspect.getsource(helper)))
    return reads


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_reads_only_what_its_node_type_saves(name):
    """Each rule's node type is one torch has (``torch._C._functions``, where every autograd node type is
    declared with its saved attributes), and every ``_saved_*`` its rule reads is one of that type's: the only check
    a rule for a node the CPU cannot produce gets here (cudnn's batch norm names eps ``_saved_epsilon``, the native
    one ``_saved_eps``; reading the latter off the former would have failed the first meta step on a GPU)."""
    node_type = getattr(torch._C._functions, name, None)
    assert node_type is not None, f"torch has no autograd node {name}"
    reads = _saved_reads(RULES[name])
    missing = sorted(a for a in reads if not hasattr(node_type, a))
    assert not missing, f"{name} saves no {missing}"
    assert name != "NativeBatchNormBackward0" or {"_saved_eps", "_saved_result2"} <= reads  # the scan sees helpers


class _ThroughCudnnAttributes:
    """A CPU batch norm node read through the attributes cudnn's node type declares: the same saved tensors
    (derivatives.yaml gives both one forward-mode formula of result1, result2), eps as ``_saved_epsilon``; any
    attribute cudnn's node does not have raises, as it would on a GPU."""

    declared = frozenset(dir(torch._C._functions.CudnnBatchNormBackward0))

    def __init__(self, node):
        self._node = node

    def __getattr__(self, attr):
        if attr not in self.declared:
            raise AttributeError(f"CudnnBatchNormBackward0 has no {attr}")
        return getattr(self._node, "_saved_eps" if attr == "_saved_epsilon" else attr)


def test_the_cudnn_batch_norm_rule_through_that_nodes_attributes():
    """The rule a GPU's batch norm takes (``UNVERIFIED``: the first graph of a kind holding it is also checked
    against the forward mode there), run on a CPU node seen through cudnn's attribute names: the forward mode's
    tangent for every combination of input / weight / bias tangents, and refused in eval mode."""
    assert "CudnnBatchNormBackward0" in UNVERIFIED
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    x, w, b = torch.randn(6, 3, 4, 4, **f64), torch.rand(3, **f64) + 0.5, torch.randn(3, **f64)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    stats = torch.zeros(3, **f64), torch.ones(3, **f64)

    def bn(*args, training=True):
        return F.batch_norm(args[0], stats[0].clone(), stats[1].clone(), args[1], args[2], training=training, eps=1e-3)

    node = bn(x.requires_grad_(), w.requires_grad_(), b.requires_grad_()).grad_fn
    rule = RULES["CudnnBatchNormBackward0"]
    for keep in ((1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)):
        t = [ti if k else None for ti, k in zip((tx, tw, tb), keep)]
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p.detach(), ti if k else torch.zeros_like(ti))
                     for p, ti, k in zip((x, w, b), (tx, tw, tb), keep)]
            ref = fwAD.unpack_dual(bn(*duals)).tangent
        got = rule(_ThroughCudnnAttributes(node), t)
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12), keep
    with pytest.raises(Unsupported, match="eval mode"):
        rule(_ThroughCudnnAttributes(bn(x, w, b, training=False).grad_fn), [tx, tw, tb])


class _GpuDropout(nn.Module):
    """Dropout as ``F.dropout`` runs it on a GPU in train mode (the fused ``native_dropout``, NativeDropoutBackward0);
    on the CPU it is a multiplication by the mask."""

    def forward(self, x):
        return torch.native_dropout(x, 0.4, True)[0]


def test_gpu_dropout_keeps_the_forward_mask_and_the_unverified_check_compares_like_with_like(monkeypatch):
    """The fused dropout's rule: the forward's mask over 1 - p (against the forward mode drawing the same masks).
    And the first-use check of a graph with an unverified rule (batch norm stands in for cudnn's) compares the two
    ways on the same masks: it accepts the right rules although the step's forward drew other masks, leaves the
    RNG where it was, and still refuses a wrong rule."""
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), _GpuDropout(), nn.Linear(8, 6)),
                       6, 3).double().train()
    x = torch.randn(16, 4, dtype=torch.float64)
    assert "NativeDropoutBackward0" in node_types(model(x))
    u, ref = _jvp_both_ways(model, x)
    assert ref.abs().max() > 1e-3
    assert torch.allclose(u, ref, rtol=1e-10, atol=1e-12)

    names, params = meta._trainable(model)
    tangents = [torch.randn_like(p) for p in params]
    monkeypatch.setattr(meta, "_GRAPH_JVP_CHECKED", {})
    monkeypatch.setattr(meta.graph_jvp, "UNVERIFIED", frozenset({"NativeBatchNormBackward0"}))
    z = model(x)
    rng = torch.get_rng_state()
    u = meta._logit_jvp(model, names, params, tangents, x, z)
    assert list(meta._GRAPH_JVP_CHECKED.values()) == [True]
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.allclose(u, graph_jvp(z, dict(zip(params, tangents))), rtol=1e-12, atol=0)  # the step's masks
    monkeypatch.setattr(meta, "_GRAPH_JVP_CHECKED", {})
    monkeypatch.setitem(RULES, "NativeDropoutBackward0", lambda node, t: t[0])
    with pytest.warns(RuntimeWarning, match="forward mode"):
        meta._logit_jvp(model, names, params, tangents, x, model(x))
    assert list(meta._GRAPH_JVP_CHECKED.values()) == [False]


def test_the_unverified_rule_check_runs_without_autocast(monkeypatch):
    """Under bfloat16 autocast (a GPU run) the first-use check computes both ways in the parameters' float32, where a
    right rule agrees to rounding, not in bfloat16 (~2% apart on ResNet-32 already); the step keeps the bfloat16
    graph's u. The spy records the dtype of every output ``graph_jvp`` walks."""
    monkeypatch.setattr(meta, "_GRAPH_JVP_CHECKED", {})
    monkeypatch.setattr(meta.graph_jvp, "UNVERIFIED", frozenset({"NativeBatchNormBackward0"}))
    walked, walk = [], meta.graph_jvp.graph_jvp
    monkeypatch.setattr(meta.graph_jvp, "graph_jvp", lambda out, t: walked.append(out.dtype) or walk(out, t))
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, in_chans=1).train()
    x = torch.randn(8, 1, 12, 12)
    names, params = meta._trainable(model)
    tangents = [torch.randn_like(p) for p in params]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
        u = meta._logit_jvp(model, names, params, tangents, x, z)
    assert walked == [torch.bfloat16, torch.float32]  # the step's graph, then the check's
    assert list(meta._GRAPH_JVP_CHECKED.values()) == [True] and u.dtype == torch.bfloat16


def test_a_node_without_a_rule_is_named_and_the_meta_step_uses_the_forward_mode():
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(4, 6), nn.GELU()), 6, 3).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(Unsupported, match="GeluBackward0"):
        node_types(model(x))
    names, params = meta._trainable(model)
    tangents = [torch.randn_like(p) for p in params]
    z = model(x)
    with pytest.warns(RuntimeWarning, match="forward mode .*GeluBackward0"):
        u = meta._logit_jvp(model, names, params, tangents, x, z)
    assert torch.allclose(u, meta.forward_mode_jvp(model, names, params, tangents, x), rtol=1e-12)


def test_a_rule_that_refuses_during_the_walk_also_falls_back():
    """Batch norm in eval mode (its rule is for train mode) is found only when the walk reaches it."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, in_chans=1).double().eval()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    names, params = meta._trainable(model)
    tangents = [torch.randn_like(p) for p in params]
    with pytest.warns(RuntimeWarning, match="forward mode .*eval mode"):
        u = meta._logit_jvp(model, names, params, tangents, x, model(x))
    assert torch.allclose(u, meta.forward_mode_jvp(model, names, params, tangents, x), rtol=1e-12)


def test_a_graph_that_disagrees_with_the_forward_mode_is_not_used_again(monkeypatch):
    """The guard for rules the tests cannot run here (cudnn's batch norm; ReLU's stands in for it): the first graph
    of a kind holding one is computed both ways; a wrong rule (ReLU's replaced by the identity) gives a warning and
    the forward mode's u, then and on every later call, without recomputing the graph's."""
    monkeypatch.setattr(meta, "_GRAPH_JVP_CHECKED", {})
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, in_chans=1).double().train()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    names, params = meta._trainable(model)
    tangents = [torch.randn_like(p) for p in params]

    def u_now():
        return meta._logit_jvp(model, names, params, tangents, x, model(x))

    right = u_now()
    assert meta._GRAPH_JVP_CHECKED == {}  # every rule of this graph is tested: no check
    monkeypatch.setattr(meta.graph_jvp, "UNVERIFIED", frozenset({"ReluBackward0"}))
    assert torch.allclose(u_now(), right, rtol=1e-12, atol=0)  # the correct rules: checked once, kept
    assert list(meta._GRAPH_JVP_CHECKED.values()) == [True]
    monkeypatch.setattr(meta, "_GRAPH_JVP_CHECKED", {})
    monkeypatch.setitem(RULES, "ReluBackward0", lambda node, t: t[0])
    with pytest.warns(RuntimeWarning, match="forward mode"):
        first = u_now()
    assert list(meta._GRAPH_JVP_CHECKED.values()) == [False]
    calls = []
    monkeypatch.setattr(meta.graph_jvp, "graph_jvp", lambda *a: calls.append(a))
    second = u_now()
    assert not calls
    for u in (first, second):
        assert torch.allclose(u, right, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("name", ["resnet32", "small_cnn"])
def test_channels_last_and_bfloat16_autocast_graphs_match_the_forward_mode(name, amp, device, no_tf32):
    """What `dynloss train` turns on with a GPU (channels_last, bfloat16 autocast), on the CPU and on a GPU: the
    casts (ToCopyBackward0), the channels_last pool's re-striding (AsStridedBackward1 on the CPU) and bfloat16 saved
    activations; on a GPU batch norm may be cudnn's node (CudnnBatchNormBackward0, its own saved tensors: the
    rule's first GPU check), compared in float32 with TF32 off. Under autocast both ways compute in bfloat16 and
    differ by its rounding (~2% on ResNet-32 on the CPU, against O(1) for a wrong rule); without it they agree to
    float32 rounding."""
    in_chans, size, _ = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_chans=in_chans).train().to(device, memory_format=torch.channels_last)
    x = torch.randn(16, in_chans, size, size, device=device).to(memory_format=torch.channels_last)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        u, ref = _jvp_both_ways(model, x)
        types = node_types(model(x))
    assert ("ToCopyBackward0" in types) == amp
    err = float((u.float() - ref.float()).norm() / ref.float().norm())
    assert err < (0.1 if amp else 1e-4), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("amp", [False, True])
def test_on_a_gpu_the_meta_steps_jvp_trusts_a_right_graph_and_leaves_the_rng_alone(amp, monkeypatch, no_tf32):
    """ResNet-32 on the GPU as `dynloss train` runs it (channels_last; bfloat16 autocast, or float32 with TF32 off):
    ``meta._logit_jvp`` returns the graph's u without a fallback warning - where the graph holds cudnn's batch norm
    (an unverified rule) after checking it once against the forward mode - and leaves the CPU and CUDA generators
    as they were."""
    monkeypatch.setattr(meta, "_GRAPH_JVP_CHECKED", {})
    torch.manual_seed(0)
    model = build_model("resnet32", num_classes=5, in_chans=3).train().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    names, params = meta._trainable(model)
    tangents = [1e-2 * torch.randn_like(p) for p in params]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        z = model(x)
        types = node_types(z)
        rng = torch.get_rng_state(), torch.cuda.get_rng_state()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            u = meta._logit_jvp(model, names, params, tangents, x, z)
        assert not [str(w.message) for w in seen if "forward mode" in str(w.message)]  # what a fallback warns
        assert torch.equal(torch.get_rng_state(), rng[0]) and torch.equal(torch.cuda.get_rng_state(), rng[1])
        ref = meta.forward_mode_jvp(model, names, params, tangents, x)
    checked = bool(UNVERIFIED.intersection(types))
    assert list(meta._GRAPH_JVP_CHECKED.values()) == ([True] if checked else []), types
    err = float((u.float() - ref.float()).norm() / ref.float().norm())
    assert err < (0.05 if amp else 1e-4), (err, types)
