"""`dynloss benchmark scaling`: the data-parallel meta step (dynloss.distributed) at world size 1 against 2.

Each world size runs in freshly spawned processes (torch.multiprocessing, a process group on a free local TCP
port: gloo on CPU, NCCL with one GPU per worker when >= 2 GPUs are present). World 1 is one process with the
global batch B; world 2 is two processes with B/2 each, worker r taking the contiguous r-th half of every train
and meta batch, the model DDP-wrapped and the hooks from `dynloss.distributed.meta_hooks()`. Components come
from `dynloss.builder.build_components`, the iteration is `dynloss.engine.train_one_epoch` (as in `step`).

1. Equality: after `--check-iters` meta iterations (full scope, softmax mix: nothing random, bfloat16 off)
   the classifier theta and the Dynamic Loss phi (label corrector + margin generator) of both world-2 workers
   must equal world 1's: max |theta_w2 - theta_w1| <= 1e-4 x max |theta_w1|, the same for phi. Every
   BatchNorm is replaced by nn.Identity in this phase: per-worker statistics of B/2 rows differ from those of
   B rows by design, so with BN the two runs would differ without a bug.
2. Throughput (strong scaling, the real model with BN, the gumbel mix as in training): `--warmup` untimed
   then `--iters` timed meta iterations; images/s in total and per worker, the per-worker ratio
   world 2 / world 1 (1.0 = linear) and the total speed-up. On a CPU each process gets cores // world torch
   threads, so both world sizes use the same cores.

    python -m pipelines.benchmark scaling                                   # small_cnn, global batch 128
    python -m pipelines.benchmark scaling --model resnet32 --iters 8 --json scaling.json
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

from pipelines.benchmarks import Runner, device_name, emit, subcommand
from pipelines.benchmarks.step import INPUTS, NUM_CLASSES, synthetic_components

RTOL = 1e-4  # of max |theta| (|phi|): the equality tolerance


def _components(o: dict, world: int, rank: int, mix: str, amp: str):
    return synthetic_components(o["model"], o["batch"], o["device"], dynamic={"scope": "full", "meta_grad": "jvp",
                                "mix": mix}, train={"amp": amp}, world=world, rank=rank)


def _data(c, o: dict, n: int, world: int, rank: int):
    """n global train and meta batches (the same in every process), worker ``rank``'s contiguous part of each."""
    import torch

    g = torch.Generator().manual_seed(o["seed"])
    b = o["batch"]
    part = slice(rank * b // world, (rank + 1) * b // world)

    def batch() -> dict:
        x = torch.randn(b, c.preset.channels, *c.preset.size, generator=g)[part]
        return {"x": c.input(x), "label": torch.randint(0, NUM_CLASSES, (b,), generator=g)[part].to(c.device)}

    train = [{"id": torch.arange(i * b, (i + 1) * b)[part], **batch()} for i in range(n)]
    meta = [batch() for _ in range(n)]
    table = torch.randint(0, c.cfg.dynamic.rank_buckets, (b * n,), generator=g).to(c.device)
    return train, meta, table


def _run(c, model, train, meta, table, iters: int, iteration: int = 0) -> int:
    import itertools

    from dynloss.distributed import meta_hooks
    from dynloss.engine import train_one_epoch

    virtual_hook, meta_hook = meta_hooks()
    with c.autocast():
        _, iteration = train_one_epoch(
            model, c.optimizer, (train[i % len(train)] for i in range(iters)), epoch=0, settings=c.settings,
            dyn=c.dyn, meta_optimizer=c.meta_optimizer, rank_table=table, meta_batches=itertools.cycle(meta),
            iteration=iteration, virtual_grad_hook=virtual_hook, meta_grad_hook=meta_hook)
    return iteration


def _wrap(model, world: int, device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model if world == 1 else DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _equality(o: dict, world: int, rank: int) -> dict:
    import torch
    from torch import nn

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    c = _components(o, world, rank, mix="softmax", amp="off")
    for name, module in list(c.model.named_modules()):  # see the module docstring: BN -> Identity here
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, child = name.rpartition(".")
            setattr(c.model.get_submodule(parent), child, nn.Identity())
    theta0 = {k: v.detach().cpu().clone() for k, v in c.model.state_dict().items()}
    phi0 = {k: v.detach().cpu().clone() for k, v in c.dyn.state_dict().items()}
    _run(c, _wrap(c.model, world, c.device), *_data(c, o, o["check_iters"], world, rank), o["check_iters"])
    return {"theta": {k: v.detach().cpu() for k, v in c.model.state_dict().items()}, "theta0": theta0,
            "phi": {k: v.detach().cpu() for k, v in c.dyn.state_dict().items()}, "phi0": phi0}


def _throughput(o: dict, world: int, rank: int) -> dict:
    import torch

    from dynloss.distributed import barrier

    c = _components(o, world, rank, mix="gumbel", amp="auto")
    model, data = _wrap(c.model, world, c.device), _data(c, o, 4, world, rank)  # 4 batches, reused
    sync = torch.cuda.synchronize if c.device.type == "cuda" else (lambda: None)
    iteration = _run(c, model, *data, o["warmup"])
    sync()
    barrier()  # every worker starts the clock with the warm-up done
    t0 = time.perf_counter()
    _run(c, model, *data, o["iters"], iteration)
    sync()
    barrier()
    seconds = time.perf_counter() - t0
    return {"seconds_per_iter": seconds / o["iters"], "amp": str(c.amp).replace("torch.", "") if c.amp else "off"}


def _worker(rank: int, world: int, port: int, out: str, o: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(o["threads"][world])
    if o["device"] == "cuda":
        torch.cuda.set_device(rank)
        o = {**o, "device": f"cuda:{rank}"}
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(o["backend"], rank=rank, world_size=world)
    try:
        result = {"equality": _equality(o, world, rank), "throughput": _throughput(o, world, rank)}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _spawn(world: int, o: dict) -> list[dict]:
    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, port, out, o), nprocs=world, join=True, start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def _max_abs(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def _compare(one: dict, two: list[dict], iters: int) -> dict:
    r = {"iters": iters, "mix": "softmax", "batch_norm": "replaced by nn.Identity", "rtol": RTOL}
    for part in ("theta", "phi"):
        scale = max(float(v.abs().max()) for v in one[part].values() if v.numel())
        r[f"{part}_max_abs_diff"] = max(_max_abs(w[part], one[part]) for w in two)
        r[f"{part}_tolerance"] = RTOL * scale
        r[f"{part}_moved"] = _max_abs(one[part], one[f"{part}0"])  # the check is not vacuous when > 0
    r["passed"] = all(r[f"{p}_max_abs_diff"] <= r[f"{p}_tolerance"] for p in ("theta", "phi"))
    return r


def run_scaling(args: argparse.Namespace) -> int:
    import torch

    if args.batch_size % 2 or min(args.iters, args.check_iters) < 1 or args.warmup < 0:
        raise ValueError("--batch-size must be even, --iters and --check-iters >= 1, --warmup >= 0")
    gpus = torch.cuda.device_count()
    backend = args.backend if args.backend != "auto" else ("nccl" if gpus >= 2 else "gloo")
    if backend == "nccl" and gpus < 2:
        raise ValueError(f"--backend nccl needs 2 GPUs, found {gpus}")
    device = "cuda" if backend == "nccl" else "cpu"
    cores = len(os.sched_getaffinity(0))
    o = {"model": args.model, "batch": args.batch_size, "iters": args.iters, "warmup": args.warmup,
         "check_iters": args.check_iters, "seed": args.seed, "device": device, "backend": backend,
         "threads": {w: max(1, cores // w) for w in (1, 2)}}
    runs = {w: _spawn(w, o) for w in (1, 2)}
    rows = []
    for w in (1, 2):
        t = runs[w][0]["throughput"]
        total = args.batch_size / t["seconds_per_iter"]
        rows.append({"world": w, "batch_per_worker": args.batch_size // w, "threads": o["threads"][w], **t,
                     "images_per_s": total, "images_per_s_per_worker": total / w})
    name = device_name(device)
    report = {"benchmark": "scaling", "model": args.model, "device": name, "backend": backend,
              "torch": torch.__version__, "batch_size": args.batch_size, "host_cpus": cores,
              "load_average_1min": os.getloadavg()[0],
              "equality": _compare(runs[1][0]["equality"], [r["equality"] for r in runs[2]], args.check_iters),
              "throughput": {"iters": args.iters, "warmup": args.warmup, "mix": "gumbel", "rows": rows,
                             "ratio_per_worker": rows[1]["images_per_s_per_worker"] / rows[0]["images_per_s_per_worker"],
                             "speedup_total": rows[1]["images_per_s"] / rows[0]["images_per_s"]}}
    emit(report, print_scaling, args.json)
    return 0 if report["equality"]["passed"] else 1


def print_scaling(r: dict) -> None:
    e, t = r["equality"], r["throughput"]
    b = r["batch_size"]
    print(f"scaling: {r['model']}, {r['device']}, {r['backend']}, torch {r['torch']}, global batch {b}, "
          f"1-min load {r['load_average_1min']:.1f} on {r['host_cpus']} CPUs")
    print(f"equality after {e['iters']} meta iterations, world 2 ({b // 2} each) vs world 1 ({b}); full scope, "
          f"softmax mix, BatchNorm replaced by nn.Identity:")
    for p in ("theta", "phi"):
        print(f"  {p:<6}max |w2 - w1| {e[f'{p}_max_abs_diff']:.2e}  tolerance {e[f'{p}_tolerance']:.2e}  "
              f"(moved {e[f'{p}_moved']:.2e} from the start)")
    print(f"  -> {'passed' if e['passed'] else 'FAILED'}")
    print(f"throughput, real model (BN kept), gumbel mix, {t['warmup']} warm-up + {t['iters']} timed iterations:")
    print(f"{'world':>5}{'batch/worker':>14}{'threads':>9}{'ms/iter':>9}{'images/s':>10}{'images/s/worker':>17}"
          f"{'amp':>6}")
    for x in t["rows"]:
        print(f"{x['world']:>5}{x['batch_per_worker']:>14}{x['threads']:>9}{x['seconds_per_iter'] * 1e3:>9.1f}"
              f"{x['images_per_s']:>10.0f}{x['images_per_s_per_worker']:>17.0f}{x['amp']:>6}")
    print(f"world 2 / world 1: per worker {t['ratio_per_worker']:.2f} (1.00 = linear), "
          f"total speed-up {t['speedup_total']:.2f}")


@subcommand("scaling", help="world size 1 vs 2: parameters equal after k meta iterations, images/s per worker")
def scaling(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", choices=sorted(INPUTS), default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128, help="global: world 2 gives each worker half")
    parser.add_argument("--iters", type=int, default=8, help="timed meta iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta iterations first")
    parser.add_argument("--check-iters", type=int, default=3, help="meta iterations before the equality check")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                        help="auto: nccl (one GPU per worker) with >= 2 GPUs, else gloo on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return run_scaling
