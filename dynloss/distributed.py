"""The data-parallel pieces of the bi-level step, in plain torch.distributed (no Ray).

DESIGN.md section 5, "Train": every worker does the virtual step on its local batch with the gradient
*averaged across workers*, so theta'(phi) equals the virtual step of one big batch; the meta-gradients of phi
(label corrector + margin generator) are averaged; the actual step goes through DDP.

* ``average_virtual_grads`` is the ``virtual_grad_hook`` of ``dynloss.meta.meta_step``: a *differentiable*
  all-reduce mean (``torch.distributed.nn.functional.all_reduce``). Its backward all-reduces the incoming
  gradient, so the meta loss of every worker reaches phi through every worker's virtual gradient; followed by
  ``average_meta_grads`` this is exactly the gradient of the mean meta loss of one big meta batch.
* ``average_meta_grads`` is the ``meta_grad_hook``: an in-place all-reduce mean of phi's gradients.
Both coalesce their tensors into one flat buffer: one collective per call, not one per parameter.

With world size 1 (or no process group) ``meta_hooks()`` returns (None, None) and nothing is communicated.
``all_gather_arrays`` gathers per-worker numpy arrays of different lengths (the ranking pass).

    python -m pytest tests/test_distributed.py -q      # world size 1 with batch B == world size 2 with B/2
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.x deprecates torch.distributed.nn.functional in favour of _functional_collectives, whose all_reduce
# has no autograd formula; the old one is still the differentiable all-reduce, so keep it and stay quiet.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def average_virtual_grads(grads: Sequence[Tensor]) -> list[Tensor]:
    """Differentiable mean over workers of the virtual-step gradients (keeps the graph to phi)."""
    if not is_distributed():
        return list(grads)
    from torch.distributed.nn.functional import all_reduce

    flat = all_reduce(_flat(grads), op=dist.ReduceOp.SUM) / dist.get_world_size()
    return _unflat(flat, grads)


@torch.no_grad()
def average_meta_grads(grads: Sequence[Tensor]) -> None:
    """In-place mean over workers of phi's gradients (after the meta backward, before Adam steps)."""
    if not is_distributed() or not grads:
        return
    flat = _flat(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for g, avg in zip(grads, _unflat(flat, grads)):
        g.copy_(avg)


def meta_hooks():
    """``(virtual_grad_hook, meta_grad_hook)`` for ``dynloss.engine.train_one_epoch``; (None, None) alone."""
    return (average_virtual_grads, average_meta_grads) if is_distributed() else (None, None)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every worker. DDP syncs them at the start of each
    training forward, so after the epoch's last step each worker holds its own batch's update: without this the
    workers would rank and evaluate with slightly different models, none of them the one rank 0 checkpoints."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for buffer in module.buffers():  # float statistics and int64 batch counters: one collective per dtype
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    with torch.no_grad():
        for buffers in by_dtype.values():
            flat = _flat(buffers)
            dist.broadcast(flat, src=0)
            for b, value in zip(buffers, _unflat(flat, buffers)):
                b.copy_(value)


def _device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each worker's 1-D numeric arrays (same keys everywhere, any lengths) in rank order.

    Every worker gets the same result. Values travel as float64 or int64 (padded to the longest part),
    so int64 ids and float32 losses come back exactly.
    """
    keys = sorted(arrays)
    if not is_distributed():
        return {k: np.asarray(arrays[k]) for k in keys}
    device = _device()
    n = len(arrays[keys[0]]) if keys else 0
    if any(len(arrays[k]) != n for k in keys):
        raise ValueError(f"all_gather_arrays: arrays must have one length per worker, got "
                         f"{ {k: len(arrays[k]) for k in keys} }")
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device))
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    out = {}
    for k in keys:
        a = np.asarray(arrays[k])
        dtype = torch.int64 if np.issubdtype(a.dtype, np.integer) or a.dtype == bool else torch.float64
        local = torch.zeros(longest, dtype=dtype, device=device)
        local[:n] = torch.as_tensor(a, device=device).to(dtype)
        parts = [torch.empty_like(local) for _ in sizes]
        dist.all_gather(parts, local)
        joined = torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu().numpy()
        out[k] = joined.astype(a.dtype, copy=False)
    return out


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Mean over workers of scalar statistics (same keys everywhere); NaN-free values expected."""
    return _all_reduce(values, mean=True)


def all_reduce_sum(values: Mapping[str, float]) -> dict[str, float]:
    return _all_reduce(values, mean=False)


def _all_reduce(values: Mapping[str, float], mean: bool) -> dict[str, float]:
    keys = sorted(values)
    if not is_distributed() or not keys:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if mean:
        t /= dist.get_world_size()
    return dict(zip(keys, t.cpu().tolist()))


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every worker (one tiny collective)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
