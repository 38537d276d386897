"""Jacobian-vector products of a tensor along parameter tangents, read off the autograd graph that produced it.

A forward-mode pass (``torch.autograd.forward_ad``, ``torch.func.jvp``) recomputes the network's primal values
beside the tangents: for a convolution that is three convolutions (the primal, and the tangent's two terms
conv(t_x, W) + conv(x, t_W)), ~2.5 forward passes in all (docs/performance.md). The meta step already holds
those primal values: the first forward's autograd graph keeps every activation its backward needs (a conv's
input and weight, a ReLU's output, a batch norm's input and batch statistics, a max pool's indices). ``graph_jvp``
walks that graph from the parameters to the output and applies each node's forward-mode rule to the saved
values, so only the tangent arithmetic runs: two convolutions per convolution, ~the cost of two no-grad forwards.
It is the JVP torch's forward mode computes (the same rules as its derivatives.yaml), checked against
``torch.autograd.forward_ad`` to float64 precision on every registered model (tests/test_graph_jvp.py).
``torch.func.linearize`` makes the same split, but by tracing the function anew (``make_fx``), primal included,
each time it is called: the meta step would pay for the primal again on every iteration.

Only the nodes the registered models produce have a rule (``RULES``); a graph with any other node raises
``Unsupported`` naming it, before any arithmetic (a few rules refuse a case of their node when the walk reaches it:
batch norm in eval mode, a general ``as_strided``), and ``dynloss.meta`` falls back to the forward-mode pass. The
walk reads ``grad_fn._saved_*`` and ``Node._input_metadata`` (the shape and dtype of a node's forward output),
the attributes torch exposes for inspecting saved tensors and that compiled autograd uses.

    .venv/bin/python -m pytest tests/test_graph_jvp.py -q
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

# rules whose node the test suite cannot produce on a CPU: dynloss.meta checks a graph holding one against the
# forward mode once before trusting it
UNVERIFIED = frozenset({"CudnnBatchNormBackward0"})

Rule = Callable[[object, list], Tensor | None]
RULES: dict[str, Rule] = {}


class Unsupported(RuntimeError):
    """The graph holds a node without a forward-mode rule here (the caller uses torch's forward mode instead)."""


def _rule(*names: str):
    def register(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn
    return register


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _signed(d: int) -> int:
    """A dim saved as an unsigned 64-bit integer (-1 reads back as 2**64 - 1)."""
    return d - (1 << 64) if d >= (1 << 63) else d


def _out(node) -> tuple[list[int], torch.dtype]:
    meta = node._input_metadata[0]
    return list(meta.shape), meta.dtype


@_rule("TBackward0")
def _t(node, t):
    return None if t[0] is None else t[0].t()


@_rule("AddmmBackward0")
def _addmm(node, t):
    bias, a, b = t
    out = None
    if a is not None:
        out = a @ node._saved_mat2
    if b is not None:
        out = _add(out, node._saved_mat1 @ b)
    if out is not None and node._saved_alpha != 1:
        out = out * node._saved_alpha
    if bias is not None:
        out = _add(out, bias * node._saved_beta if node._saved_beta != 1 else bias)
    return out


@_rule("MmBackward0")
def _mm(node, t):
    a, b = t
    out = None if a is None else a @ node._saved_mat2
    return out if b is None else _add(out, node._saved_self @ b)


@_rule("ConvolutionBackward0")
def _conv(node, t):
    tx, tw, tb = (list(t) + [None])[:3]
    args = (node._saved_stride, node._saved_padding, node._saved_dilation, node._saved_transposed,
            node._saved_output_padding, node._saved_groups)
    out = None if tx is None else torch.convolution(tx, node._saved_weight, None, *args)
    if tw is not None:
        term = torch.convolution(node._saved_input, tw, None, *args)
        out = term if out is None else out.add_(term)  # ``out`` is this rule's own tensor
    if tb is not None:
        tb = tb.view(1, -1, *([1] * (len(_out(node)[0]) - 2)))
        out = tb.expand(_out(node)[0]).clone() if out is None else out.add_(tb)
    return out


def _batch_norm(node, t, eps: float):
    """Train mode: y = w * xhat + b, xhat = (x - mean) * invstd with the batch's statistics. The Jacobian in x,
    w * invstd * (I - 11^T / N - xhat xhat^T / N) per channel, is symmetric, so its product with t_x is the
    backward kernel's grad_input for grad_output = t_x (one fused pass); t_w * xhat + t_b is added to it."""
    tx, tw, tb = (list(t) + [None, None])[:3]
    if not node._saved_training:
        raise Unsupported("batch norm in eval mode")  # the meta step runs the classifier in train mode
    x, mean, invstd = node._saved_input, node._saved_result1, node._saved_result2
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = None
    if tx is not None:
        out = torch.ops.aten.native_batch_norm_backward(
            tx.contiguous(memory_format=_memory_format(x)), x, node._saved_weight, None, None, mean, invstd, True,
            eps, [True, False, False])[0]
    if tw is None and tb is None:
        return out
    k = torch.zeros_like(invstd) if tw is None else tw * invstd   # t_w * xhat + t_b = k * x + c
    c = -k * mean if tb is None else tb - k * mean
    k, c = k.to(x.dtype).view(shape), c.to(x.dtype).view(shape)
    return torch.addcmul(c, x, k) if out is None else out.addcmul_(x, k).add_(c)


@_rule("NativeBatchNormBackward0")
def _native_batch_norm(node, t):
    return _batch_norm(node, t, node._saved_eps)


@_rule("CudnnBatchNormBackward0")
def _cudnn_batch_norm(node, t):
    """cudnn's batch norm (a GPU's, in train and eval mode) saves what the native one does - result1 the batch
    mean, result2 its inverse standard deviation: derivatives.yaml gives both nodes the same forward-mode formula
    of them - but names eps ``epsilon``."""
    return _batch_norm(node, t, node._saved_epsilon)


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


@_rule("ReluBackward0")
def _relu(node, t):
    return None if t[0] is None else torch.ops.aten.threshold_backward(t[0], node._saved_result, 0)


@_rule("TanhBackward0")
def _tanh(node, t):
    return None if t[0] is None else torch.ops.aten.tanh_backward(t[0], node._saved_result)


@_rule("SigmoidBackward0")
def _sigmoid(node, t):
    return None if t[0] is None else torch.ops.aten.sigmoid_backward(t[0], node._saved_result)


@_rule("AddBackward0")
def _add_node(node, t):
    a, b = t
    alpha = node._saved_alpha
    out = _add(a, b if b is None or alpha == 1 else b * alpha)
    return None if out is None else out.expand(_out(node)[0])  # one broadcast operand alone keeps its own shape


@_rule("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")
def _view(node, t):
    return None if t[0] is None else t[0].reshape(_out(node)[0])


@_rule("MeanBackward1")
def _mean(node, t):
    return None if t[0] is None else t[0].mean([_signed(d) for d in node._saved_dim], keepdim=node._saved_keepdim)


@_rule("ConstantPadNdBackward0")
def _pad(node, t):
    return None if t[0] is None else F.pad(t[0], list(node._saved_pad))


@_rule("SliceBackward0")
def _slice(node, t):
    if t[0] is None:
        return None
    dim, start, end, step = _signed(node._saved_dim), node._saved_start, node._saved_end, node._saved_step
    idx = [slice(None)] * t[0].dim()
    idx[dim] = slice(start, end, step)
    return t[0][tuple(idx)]


@_rule("MaxPool2DWithIndicesBackward0")
def _max_pool(node, t):
    if t[0] is None:
        return None
    idx = node._saved_result1
    return t[0].flatten(2).gather(2, idx.flatten(2)).view_as(idx)


@_rule("AdaptiveAvgPool2DBackward0")
def _adaptive_avg_pool(node, t):
    return None if t[0] is None else F.adaptive_avg_pool2d(t[0], _out(node)[0][-2:])


@_rule("MulBackward0")
def _mul(node, t):
    """Also dropout in train mode: x * (mask / (1 - p)), the mask the forward drew."""
    a, b = t
    out = None if a is None else a * node._saved_other
    return out if b is None else _add(out, node._saved_self * b)


@_rule("NativeDropoutBackward0")
def _native_dropout(node, t):
    """Dropout in train mode on a GPU (``F.dropout`` calls this fused op there, and only in train mode; on the CPU
    it is a ``MulBackward0``): the tangent times the forward's mask, scaled by 1 / (1 - p)."""
    if t[0] is None:
        return None
    p = node._saved_p
    return t[0] * node._saved_result1 * (0.0 if p == 1 else 1.0 / (1.0 - p))


@_rule("CatBackward0")
def _cat(node, t):
    if all(ti is None for ti in t):
        return None
    parts = []
    for (f, _), ti in zip(node.next_functions, t):
        if ti is None:
            if f is None:
                raise Unsupported("concatenation of a tensor that needs no grad")
            shape, dtype = _out(f)
            ti = torch.zeros(shape, dtype=dtype, device=next(x for x in t if x is not None).device)
        parts.append(ti)
    return torch.cat(parts, _signed(node._saved_dim))


@_rule("AvgPool2DBackward0")
def _avg_pool(node, t):
    if t[0] is None:
        return None
    return F.avg_pool2d(t[0], node._saved_kernel_size, node._saved_stride, node._saved_padding, node._saved_ceil_mode,
                        node._saved_count_include_pad, node._saved_divisor_override)


@_rule("AsStridedBackward1")
def _as_strided(node, t):
    """Only the identity re-striding ATen applies to a channels_last adaptive average pool's (N, C, 1, 1) output
    (``as_strided_`` with the input's own size and offset, strides differing only on dims of size 1); any
    other ``as_strided`` reads memory a tangent need not share, and is refused."""
    if t[0] is None:
        return None
    size, stride = list(node._saved_size), list(node._saved_stride)
    if node._saved_storage_offset not in (None, 0) or size != list(t[0].shape) or any(
            n > 1 and s != t[0].stride(d) for d, (n, s) in enumerate(zip(size, stride))):
        raise Unsupported("as_strided other than an identity re-striding")
    return t[0]


@_rule("ToCopyBackward0")
def _to_copy(node, t):
    return None if t[0] is None else t[0].to(_out(node)[1])


@_rule("CloneBackward0")
def _clone(node, t):
    return t[0]


def _order(root) -> list:
    """The nodes under ``root`` in an order where every node comes after its inputs (iterative DFS)."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((f, False) for f, _ in node.next_functions if f is not None and f not in seen)
    return order


def node_types(output: Tensor) -> tuple[str, ...]:
    """The sorted node types of ``output``'s graph; ``Unsupported`` if one has no rule (or there is no graph)."""
    if output.grad_fn is None:
        raise Unsupported("the output has no autograd graph")
    types = sorted({type(n).__name__ for n in _order(output.grad_fn)})
    missing = [t for t in types if t not in RULES and t != "AccumulateGrad"]
    if missing:
        raise Unsupported(f"no forward-mode rule for {', '.join(missing)}")
    return tuple(types)


@torch.no_grad()
def graph_jvp(output: Tensor, tangents: Mapping[Tensor, Tensor]) -> Tensor:
    """d output along ``tangents`` ({leaf parameter: its tangent}), from ``output``'s autograd graph.

    The graph must still hold its saved tensors (take the backward passes before this with
    ``retain_graph=True``). Leaves not in ``tangents`` (and inputs that need no grad) have tangent zero.
    Raises ``Unsupported`` naming every node type without a rule, before any arithmetic (a few rules refuse a
    case of their node when the walk reaches it: batch norm in eval mode, a general ``as_strided``). Each node's
    tangent is dropped once its last consumer has read it (peak memory ~ a no-grad forward's).
    """
    node_types(output)
    root = output.grad_fn
    order = _order(root)
    readers: dict = {}
    for node in order:
        for f, nr in node.next_functions:
            if f is not None:
                if nr != 0:
                    raise Unsupported(f"{type(node).__name__} reads output {nr} of {type(f).__name__}")
                readers[f] = readers.get(f, 0) + 1
    by_id = {id(p): t for p, t in tangents.items()}
    value: dict = {}
    for node in order:
        if type(node).__name__ == "AccumulateGrad":
            value[node] = by_id.get(id(node.variable))
            continue
        ins = []
        for f, _ in node.next_functions:
            ins.append(None if f is None else value[f])
            if f is not None:
                readers[f] -= 1
                if not readers[f]:
                    del value[f]
        value[node] = RULES[type(node).__name__](node, ins)
    u = value[root]
    return torch.zeros(_out(root)[0], dtype=output.dtype, device=output.device) if u is None else u
