"""World-size equivalence of the DDP meta-learning step (dynloss/distributed.py), on real gloo processes.

World size 1 with batch B and world size 2 with B/2 each (DDP-wrapped, the hooks the Ray loop passes) must
give the same classifier (theta) and the same label corrector + margin generator (phi) after a warm-up epoch
with corrector pre-training and an epoch of meta iterations:
a BN-free model and the softmax mix, so nothing random differs between the two runs.

    .venv/bin/python -m pytest tests/test_distributed.py -q
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dynloss import distributed
from dynloss.dynamic import DynamicLoss
from dynloss.engine import MetaSettings, train_one_epoch
from dynloss.models import Classifier

B, M, C, D, N = 16, 8, 3, 12, 64  # global train batch, global meta batch, classes, input dim, samples
ITERS = 3


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    ranks = torch.randint(0, 100, (N,), generator=g)
    return x, y, ranks


def _build(scope: str):
    torch.manual_seed(1)
    model = Classifier(nn.Sequential(nn.Linear(D, 16), nn.Tanh()), 16, C)
    dyn = DynamicLoss(C, class_counts=[30, 20, 14], margin_prior="log_prior")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4, nesterov=True)
    # SGD on phi rather than the loop's Adam: Adam divides by sqrt(v), so meta-gradients that are ~0 up to
    # float32 rounding (a saturated corrector has many) would turn rounding noise into visible updates.
    # The hooks under test only change the gradients; SGD shows any gradient difference as it is.
    return model, dyn, opt, torch.optim.SGD(dyn.parameters(), lr=2.0)


def _run(scope: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """ITERS meta iterations; worker ``rank`` of ``world`` sees a contiguous 1/world of every batch."""
    x, y, ranks = _data()
    model, dyn, opt, mopt = _build(scope)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    lb, lm = B // world, M // world
    batches = [{"id": torch.arange(i * B, (i + 1) * B)[rank * lb:(rank + 1) * lb]} for i in range(ITERS)]
    for b in batches:
        b.update(x=x[b["id"]], label=y[b["id"]])
    meta = iter([{"x": x[N - M:][rank * lm:(rank + 1) * lm], "label": y[N - M:][rank * lm:(rank + 1) * lm]}
                 for _ in range(ITERS)])
    vhook, mhook = distributed.meta_hooks()
    # epoch 0: CE warm-up through DDP + corrector pre-training; epoch 1: meta iterations
    settings = MetaSettings(scope=scope, meta_interval=1, warmup_epochs=1, corrector_pretrain_iters=ITERS,
                            mix="softmax", max_grad_norm=5.0)
    it = 0
    for epoch in (0, 1):
        _, it = train_one_epoch(model, opt, batches, epoch=epoch, settings=settings, dyn=dyn, meta_optimizer=mopt,
                                rank_table=ranks, meta_batches=meta, iteration=it, virtual_grad_hook=vhook,
                                meta_grad_hook=mhook)
    inner = model.module if world > 1 else model
    return {**{f"theta.{k}": v.detach().clone() for k, v in inner.state_dict().items()},
            **{f"phi.{k}": v.detach().clone() for k, v in dyn.state_dict().items()}}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = {scope: _run(scope, rank, world) for scope in ("full", "head")}
        # variable-length gather, as the ranking pass uses it: rank r contributes r + 2 rows
        local = {"id": np.arange(rank + 2, dtype=np.int64) + 10 * rank,
                 "loss": np.full(rank + 2, 0.5 + rank, np.float32)}
        result["gathered"] = {k: torch.as_tensor(v) for k, v in distributed.all_gather_arrays(local).items()}
        result["mean"] = torch.tensor(distributed.all_reduce_mean({"a": float(rank)})["a"])
        bn = nn.BatchNorm1d(3)  # each worker's own running statistics, as after a DDP step on its own batch
        bn(torch.randn(4, 3, generator=torch.Generator().manual_seed(rank)) + rank)
        result["bn_before"] = {k: v.clone() for k, v in bn.state_dict().items()}
        distributed.broadcast_buffers(bn)
        result["bn"] = bn.state_dict()
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2)]


@pytest.mark.parametrize("scope", ["full", "head"])
def test_world_size_2_with_half_batches_equals_world_size_1(two_workers, scope):
    single = _run(scope, 0, 1)
    start = {k: v for k, v in _build(scope)[0].state_dict().items()}
    assert any(not torch.allclose(single[f"theta.{k}"], v) for k, v in start.items()), "theta never moved"
    phi0 = _build(scope)[1].state_dict()
    assert any(not torch.allclose(single[f"phi.{k}"], v) for k, v in phi0.items()), "phi never moved"
    for r, result in enumerate(two_workers):
        for k, v in single.items():
            torch.testing.assert_close(result[scope][k], v, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {k} differs")


def test_without_the_virtual_hook_the_workers_would_disagree():
    # the equivalence above is not vacuous: a local virtual step on half the batch gives another theta'
    x, y, ranks = _data()
    model, dyn, _, _ = _build("full")
    full = torch.autograd.grad(dyn(model(x[:B]), y[:B], ranks[:B], mix="softmax").loss, list(model.parameters()))
    half = torch.autograd.grad(dyn(model(x[:B // 2]), y[:B // 2], ranks[:B // 2], mix="softmax").loss,
                               list(model.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(full, half))


def test_gather_and_reduce_helpers(two_workers):
    for result in two_workers:
        assert result["gathered"]["id"].tolist() == [0, 1, 10, 11, 12]
        assert result["gathered"]["loss"].tolist() == [0.5, 0.5, 1.5, 1.5, 1.5]
        assert result["gathered"]["loss"].dtype == torch.float32
        assert float(result["mean"]) == 0.5


def test_every_worker_ranks_and_evaluates_with_rank_0s_batch_norm_statistics(two_workers):
    rank0, rank1 = two_workers
    assert not torch.equal(rank0["bn_before"]["running_mean"], rank1["bn_before"]["running_mean"])
    for k, v in rank0["bn_before"].items():
        assert torch.equal(rank0["bn"][k], v) and torch.equal(rank1["bn"][k], v), k


def test_single_process_hooks_are_off():
    assert distributed.meta_hooks() == (None, None)
    assert distributed.all_gather_arrays({"a": np.arange(3)})["a"].tolist() == [0, 1, 2]
