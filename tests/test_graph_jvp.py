"""dynloss.graph_jvp: the logits' JVP read off the first forward's autograd graph (the full scope's meta-gradient).

Against torch's forward mode on every registered model in train mode (float64 where the model is small, float32
for vgg19_bn and Inception-ResNet-v2), with channels_last and bfloat16 autocast (what a GPU run turns on) on the
CPU and, where there is one, on a GPU, the fallback for graphs with a node it has no rule for (or a rule that
refuses during the walk), and the guard that checks the first graph of a kind holding an unverified rule against the forward mode. The meta-gradient it gives is checked against
the authors' double backward in tests/test_meta.py.

    .venv/bin/python -m pytest tests/test_graph_jvp.py -q
"""
import pytest
import torch
from test_models import CASES
from torch import nn

import dynloss.meta as meta
from dynloss.graph_jvp import RULES, Unsupported, graph_jvp, node_types
from dynloss.models import build_model
from dynloss.models.classifier import Classifier


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()  # see tests/test_models.py: small forwards on a shared 2-core box
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
def test_channels_last_and_bfloat16_autocast_graphs_match_the_forward_mode(name, amp, device, monkeypatch):
    """What `dynloss train` turns on with a GPU (channels_last, bfloat16 autocast), on the CPU and on a GPU: the
    casts (ToCopyBackward0), the channels_last pool's re-striding (AsStridedBackward1 on the CPU) and bfloat16 saved
    activations; on a GPU batch norm may be cudnn's node (CudnnBatchNormBackward0, its own saved tensors: the
    rule's first GPU check), compared in float32 with TF32 off. Under autocast both ways compute in bfloat16 and
    differ by its rounding (~2% on ResNet-32 on the CPU, against O(1) for a wrong rule); without it they agree to
    float32 rounding."""
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
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
