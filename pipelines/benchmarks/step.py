"""`dynloss benchmark step`: time and peak memory of one training iteration, Dynamic Loss against plain CE.

Same model, batch and device for every row; the iteration is the engine's (`dynloss.engine.train_one_epoch`
over batches already on the device, components from `dynloss.builder.build_components`, so bfloat16
autocast and channels_last are on exactly when `dynloss train` would turn them on). Rows: CE; the full scope
with the JVP meta-gradient (default), the finite-difference option and the authors' double backward, meta
interval 1 and 4; the head
scope, interval 1 and 4. With interval k a meta step runs on every k-th iteration and the time is the mean
over a multiple of k iterations. Each row runs in a fresh process (spawned) so that one row's allocator state
does not inflate the next: peak memory is `torch.cuda.max_memory_allocated` on a GPU and the growth of the
process's peak RSS over its resident size before the first step on a CPU (malloc keeps freed memory, so on a
CPU this is an upper bound of the step's working set).

Targets (issue 10, ResNet-32): full <= 3.5x CE, full with interval 4 <= 1.7x, head with interval 4 <= 1.3x.

    python -m pipelines.benchmark step                                   # small_cnn + resnet32 (+ resnet50 on a GPU)
    python -m pipelines.benchmark step --models resnet32 --batch-size 128 --iters 8 --json step.json
    python -m pipelines.benchmark step --models resnet32 --profile full  # torch.profiler table of one row
    python -m pipelines.benchmark step --models resnet32 --phases        # each pass of a step timed alone
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from dataclasses import asdict, dataclass

from pipelines.benchmarks import Runner, device_name, emit, subcommand

INPUTS = {  # model -> (augmentation preset, image mode): the preset gives the input size, the mode the channels
    "small_cnn": ("fashion-mnist", "L"),
    "resnet32": ("cifar", "RGB"),
    "resnet50": ("imagenet", "RGB"),
}
NUM_CLASSES = 10
TARGETS = {("full", "jvp", 1): 3.5, ("full", "jvp", 4): 1.7, ("head", "jvp", 4): 1.3}  # x CE, on ResNet-32


@dataclass(frozen=True)
class Row:
    loss: str             # "ce" or "dynamic"
    scope: str = "-"
    meta_grad: str = "-"
    interval: int = 1

    @property
    def label(self) -> str:
        if self.loss == "ce":
            return "CE"
        grad = "" if self.scope == "head" else f" {self.meta_grad}"
        return f"{self.scope}{grad} k={self.interval}"


ROWS = [Row("ce"), Row("dynamic", "full", "jvp", 1), Row("dynamic", "full", "finite_difference", 1),
        Row("dynamic", "full", "double_backward", 1),
        Row("dynamic", "full", "jvp", 4), Row("dynamic", "head", "jvp", 1), Row("dynamic", "head", "jvp", 4)]


def synthetic_components(model: str, batch: int, device: str, *, loss: str = "dynamic", dynamic: dict | None = None,
                         train: dict | None = None, rows: int | None = None, world: int = 1, rank: int = 0):
    """``dynloss.builder.build_components`` for a synthetic long-tailed (imbalance 0.1) 10-class dataset of
    ``INPUTS[model]``'s images: what `step` and `scaling` time, without reading any data. The Dynamic Loss starts
    at its meta phase (no warm-up) with margins at the log prior; ``dynamic`` and ``train`` add config keys."""
    from dynloss.builder import build_components
    from dynloss.config import Config

    preset, mode = INPUTS[model]
    raw = {"data": {"path": "synthetic", "preset": preset}, "model": {"name": model}, "loss": {"name": loss},
           "dynamic": {"warmup_epochs": 0, "margin_prior": "log_prior", **(dynamic or {})},
           "train": {"batch_size": batch, "epochs": 1, **(train or {})}}
    counts = [int(1000 * 0.1 ** (c / (NUM_CLASSES - 1))) for c in range(NUM_CLASSES)]
    manifest = {"source": "synthetic", "num_classes": NUM_CLASSES, "image": {"mode": mode},
                "splits": {"train": {"rows": rows or batch * 8, "counts": counts}}}
    return build_components(Config.model_validate(raw), manifest, device, world=world, rank=rank)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


PRECISION = {"auto": {}, "fp32": {"amp": "off", "channels_last": "off"}}  # --precision -> train.* keys


def measure(model: str, row: Row, batch: int, iters: int, warmup: int, device: str, seed: int = 0,
            profile: bool = False, repeats: int = 3, precision: str = "auto") -> dict:
    """One row in this process: seconds per iteration (the fastest of ``repeats`` timed windows of ``iters``
    iterations: other processes on the host only ever slow a window down) and peak memory above the state
    before the first step."""
    import itertools

    import torch

    from dynloss.engine import train_one_epoch

    dynamic = {"scope": row.scope, "meta_grad": row.meta_grad, "meta_interval": row.interval} \
        if row.loss == "dynamic" else {}
    c = synthetic_components(model, batch, device, loss=row.loss, dynamic=dynamic, rows=batch * (iters + warmup),
                             train=PRECISION[precision])
    cfg = c.cfg
    k = row.interval
    n_iters, n_warm = -(-iters // k) * k, -(-max(warmup, 2) // k) * k
    size = c.preset.size
    g = torch.Generator().manual_seed(seed)

    def batch_of(i: int) -> dict:
        x = torch.randn(batch, c.preset.channels, *size, generator=g)
        return {"id": torch.arange(i * batch, (i + 1) * batch), "x": c.input(x),
                "label": torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(c.device)}

    n_batches = 4  # reused: the data is not what is measured
    train = [batch_of(i) for i in range(n_batches)]
    meta = itertools.cycle([{"x": b["x"], "label": b["label"]} for b in train])
    rank_table = torch.randint(0, cfg.dynamic.rank_buckets, (batch * n_batches,), generator=g).to(c.device)
    state = {"iteration": 0}

    def run(n: int) -> None:
        stream = (train[i % n_batches] for i in range(n))
        with c.autocast():
            _, state["iteration"] = train_one_epoch(
                c.model, c.optimizer, stream, epoch=0, settings=c.settings, criterion=c.criterion, dyn=c.dyn,
                meta_optimizer=c.meta_optimizer, rank_table=rank_table, meta_batches=meta,
                iteration=state["iteration"])

    cuda = c.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # the baseline is the state before the first step: the peak counts what training adds to it (activations,
    # gradients, the optimizers' state), as a fresh process running only this step would see it
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    run(n_warm)
    sync()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=acts) as prof:
            run(n_iters)
            sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    windows = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        run(n_iters)
        sync()
        windows.append((time.perf_counter() - t0) / n_iters)
    seconds = min(windows)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"model": model, "row": row.label, **asdict(row), "seconds_per_iter": seconds,
            "peak_memory_mb": max(peak, 0) / 2**20, "device": str(c.device),
            "amp": str(c.amp).replace("torch.", "") if c.amp else "off", "channels_last": c.channels_last,
            "iters": n_iters, "repeats": len(windows), "window_spread": max(windows) / seconds - 1,
            "batch_size": batch, "input": [c.preset.channels, *size]}


def _measure_in_child(args: tuple) -> dict:
    import torch

    torch.set_num_threads(args[-1])
    return measure(*args[:-1])


def run_step(args: argparse.Namespace) -> int:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    models = args.models or (["small_cnn", "resnet32"] + (["resnet50"] if device == "cuda" else []))
    unknown = sorted(set(models) - set(INPUTS))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; known: {sorted(INPUTS)}")
    rows = [r for r in ROWS if args.rows is None or r.label in args.rows]
    threads = torch.get_num_threads()
    if args.phases:
        print_phases(phases(models[0], args.batch_size, device, args.repeats))
        return 0
    if args.profile:
        row = next(r for r in ROWS if r.loss == "dynamic" and r.scope == args.profile)
        measure(models[0], row, args.batch_size, args.iters, args.warmup, device, args.seed, profile=True,
                precision=args.precision)
        return 0
    results = []
    ctx = mp.get_context("spawn")
    for model in models:
        for row in rows:
            job = (model, row, args.batch_size, args.iters, args.warmup, device, args.seed, False, args.repeats,
                   args.precision, threads)
            if args.in_process:
                results.append(_measure_in_child(job))
            else:
                with ctx.Pool(1) as pool:
                    results.append(pool.apply(_measure_in_child, (job,)))
    name = device_name(device) + ("" if str(device).startswith("cuda") else f", {threads} threads")
    report = {"benchmark": "step", "device": name, "torch": torch.__version__, "precision": args.precision,
              "threads": threads, "batch_size": args.batch_size, "rows": _with_ratios(results),
              "host_cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    emit(report, print_step, args.json)
    return 0


def phases(model: str, batch: int, device: str, repeats: int = 3) -> dict[str, float]:
    """Milliseconds of the passes a full-scope step is made of, each timed alone (fastest of ``repeats``) on the
    model in train mode: where the step's time goes, in units of a forward pass."""
    import torch
    import torch.nn.functional as F

    from dynloss.data.batches import resolve_preset
    from dynloss.graph_jvp import graph_jvp
    from dynloss.meta import forward_mode_jvp
    from dynloss.models import build_model

    preset = resolve_preset(INPUTS[model][0], mode=INPUTS[model][1])
    c = build_model(model, NUM_CLASSES, in_chans=preset.channels).to(device)
    x = torch.randn(batch, preset.channels, *preset.size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    names, params = zip(*c.named_parameters())
    tangents = [torch.randn_like(t) for t in params]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kept = c(x)  # a forward's graph, as the step holds it when it computes the JVP

    def no_grad_forward():
        with torch.no_grad():
            c(x)

    def forward_backward():
        F.cross_entropy(c(x), y).backward()

    out = {}
    for name, fn in (("forward (graph kept)", lambda: c(x)), ("forward, no grad", no_grad_forward),
                     ("forward + backward", forward_backward),
                     ("forward-mode pass (JVP)", lambda: forward_mode_jvp(c, names, params, tangents, x)),
                     ("JVP off the graph", lambda: graph_jvp(kept, dict(zip(params, tangents))))):
        fn()
        times = []
        for _ in range(max(repeats, 1)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        out[name] = min(times) * 1e3
    return {"model": model, "batch_size": batch, "device": device, "ms": out}


def print_phases(r: dict) -> None:
    unit = r["ms"]["forward (graph kept)"]
    print(f"phases of a step: {r['model']}, batch {r['batch_size']}, {r['device']} (train mode, each alone)")
    for name, ms in r["ms"].items():
        print(f"  {name:<26}{ms:>9.1f} ms  {ms / unit:>5.2f} forward units")


def _with_ratios(results: list[dict]) -> list[dict]:
    ce = {r["model"]: r for r in results if r["loss"] == "ce"}
    for r in results:
        base = ce.get(r["model"])
        r["time_x_ce"] = r["seconds_per_iter"] / base["seconds_per_iter"] if base else None
        r["memory_x_ce"] = r["peak_memory_mb"] / base["peak_memory_mb"] if base and base["peak_memory_mb"] else None
        target = TARGETS.get((r["scope"], r["meta_grad"], r["interval"])) if r["model"] == "resnet32" else None
        r["target_x_ce"] = target
        r["target_met"] = None if target is None or r["time_x_ce"] is None else r["time_x_ce"] <= target
    return results


def print_step(report: dict) -> None:
    print(f"step: {report['device']}, torch {report['torch']}, batch {report['batch_size']}, "
          f"1-min load {report['load_average_1min']:.1f} on {report['host_cpus']} CPUs")
    print(f"{'model':<11}{'row':<30}{'ms/iter':>9}{'x CE':>7}{'peak MB':>9}{'x CE':>7}{'img/s':>8}{'amp':>10}"
          f"{'NHWC':>5}  target")
    for r in report["rows"]:
        t = f"{r['time_x_ce']:.2f}" if r["time_x_ce"] is not None else "-"
        m = f"{r['memory_x_ce']:.2f}" if r["memory_x_ce"] is not None else "-"
        target = "" if r["target_x_ce"] is None else \
            f"<= {r['target_x_ce']}x: {'met' if r['target_met'] else 'NOT met'}"
        print(f"{r['model']:<11}{r['row']:<30}{r['seconds_per_iter'] * 1e3:>9.1f}{t:>7}{r['peak_memory_mb']:>9.0f}"
              f"{m:>7}{r['batch_size'] / r['seconds_per_iter']:>8.0f}{r['amp']:>10}"
              f"{'yes' if r['channels_last'] else 'no':>5}  {target}")


@subcommand("step", help="one training iteration: Dynamic Loss (full/head, interval 1/4) vs CE, time and memory")
def step(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help=f"of {sorted(INPUTS)} (default: small_cnn resnet32, + resnet50 on a GPU)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                        help=f"only these rows (default: all of {[r.label for r in ROWS]})")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=8, help="timed iterations (rounded up to the meta interval)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed iterations first (rounded up to the meta interval)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per row; the fastest counts")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=sorted(PRECISION), default="auto",
                        help="auto: bfloat16 autocast + channels_last where `dynloss train` turns them on (a GPU); "
                             "fp32: both off (train.amp=off, train.channels_last=off)")
    parser.add_argument("--profile", choices=["full", "head"], default=None,
                        help="print a torch.profiler table of that scope's step on the first model instead")
    parser.add_argument("--phases", action="store_true",
                        help="time the passes a step is made of (forward, backward, the JVP both ways) on the first model")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every row in this process (quicker; memory figures then carry over)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return run_step
