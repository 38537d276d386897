"""Benchmarks: `dynloss benchmark SUBCOMMAND ...` / `python -m pipelines.benchmark SUBCOMMAND ...`.

ingest: images/s per CPU core of the full Ray Data path (read parquet + id filter + shuffle + decode +
weak/strong views + iteration to the consumer, `pipelines.data`) against a plain single-process
decode + augment loop over the same shards (`dynloss.data.batches.iter_local_batches`, one torch
thread), both measured in the same run, and their ratio. Per core: the single-process loop counts one
core; the Ray path counts the CPUs of the Ray runtime (`--num-cpus` for a local start). Warm-up epochs
(worker start-up, imports) run first and are reported separately, not in the rate.

    python -m pipelines.prepare digits --out data/digits
    python -m pipelines.benchmark ingest --data data/digits --split train --preset digits --epochs 2 --json ingest.json

A new benchmark is one function decorated with @subcommand: it adds its arguments to the parser it is
given and returns the function that runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

Runner = Callable[[argparse.Namespace], int]
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def subcommand(name: str, help: str):
    """Register `configure(parser) -> run(args) -> exit code` as `benchmark NAME`."""

    def register(configure: Callable[[argparse.ArgumentParser], Runner]):
        SUBCOMMANDS[name] = (help, configure)
        return configure

    return register


# ---------------------------------------------------------------------------------------------- ingest
def _consume(batches) -> tuple[int, int]:
    """Drain an iterator of batches as a training loop would; returns (images, corrupt)."""
    images = corrupt = 0
    for batch in batches:
        images += int(batch["id"].shape[0])
        corrupt += int(batch["corrupt"])
    return images, corrupt


def _timed_epochs(make_epoch: Callable[[int], object], warmup: int, epochs: int) -> dict:
    t0 = time.perf_counter()
    for e in range(warmup):
        _consume(make_epoch(e))
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = corrupt = 0
    for e in range(warmup, warmup + epochs):
        n, c = _consume(make_epoch(e))
        images, corrupt = images + n, corrupt + c
    return {"images": images, "corrupt": corrupt, "seconds": time.perf_counter() - t0, "warmup_seconds": warm}


def run_ingest(args: argparse.Namespace) -> int:
    import ray
    import torch

    from dynloss.data.batches import iter_local_batches, read_rows, resolve_preset
    from dynloss.data.manifest import read_manifest
    from dynloss.data.transforms import preset_for_source
    from pipelines.data import build_dataset, iter_train_batches
    from pipelines.ray_runtime import init_ray

    load_start = os.getloadavg()[0]
    train = not args.eval
    preset = resolve_preset(args.preset or preset_for_source(read_manifest(args.data).get("source", "")), args.data)
    # Baseline: one process, one core (torch would otherwise spread small ops over every core).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    table = read_rows(args.data, args.split)  # read once, as a single-process loader would keep it in memory
    local = _timed_epochs(lambda e: iter_local_batches(args.data, args.split, preset, train=train, batch_size=args.batch_size,
                                                       seed=args.seed, epoch=e, table=table), args.warmup, args.epochs)
    torch.set_num_threads(threads)
    local["cores"] = 1

    init_ray(args.address, num_cpus=args.num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = build_dataset(args.data, args.split, preset=preset, train=train, batch_size=args.batch_size, seed=args.seed,
                       shuffle=args.shuffle)
    remote = _timed_epochs(lambda e: iter_train_batches(ds, batch_size=args.batch_size, device="cpu", epoch=e),
                           args.warmup, args.epochs)
    remote["cores"] = float(ray.cluster_resources().get("CPU", 1))

    for r in (local, remote):
        r["images_per_s"] = r["images"] / r["seconds"]
        r["images_per_s_per_core"] = r["images_per_s"] / r["cores"]
    result = {
        "benchmark": "ingest", "data": args.data, "split": args.split, "preset": preset.name,
        "views": "weak+strong" if train else "eval", "batch_size": args.batch_size, "epochs": args.epochs,
        "warmup_epochs": args.warmup, "shuffle": args.shuffle or ("full" if train else "none"),
        "single_process": local, "ray_data": remote,
        "ratio_per_core": remote["images_per_s_per_core"] / local["images_per_s_per_core"],
        "ratio_total": remote["images_per_s"] / local["images_per_s"],
        "host_cpus": os.cpu_count(),
        # other processes on the host compete for the same cores; a load above host_cpus deflates both rates
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }
    _print_ingest(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _print_ingest(r: dict) -> None:
    print(f"ingest: {r['data']} split={r['split']} preset={r['preset']} views={r['views']} "
          f"batch={r['batch_size']} epochs={r['epochs']} (+{r['warmup_epochs']} warm-up) shuffle={r['shuffle']}")
    print(f"{'path':<16}{'images':>8}{'corrupt':>9}{'seconds':>9}{'images/s':>10}{'cores':>7}{'images/s/core':>15}"
          f"{'warm-up s':>11}")
    for name, key in (("single-process", "single_process"), ("ray data", "ray_data")):
        x = r[key]
        print(f"{name:<16}{x['images']:>8}{x['corrupt']:>9}{x['seconds']:>9.2f}{x['images_per_s']:>10.0f}"
              f"{x['cores']:>7g}{x['images_per_s_per_core']:>15.0f}{x['warmup_seconds']:>11.2f}")
    print(f"ratio ray data / single-process: per core {r['ratio_per_core']:.2f}, total {r['ratio_total']:.2f} "
          f"(host: {r['host_cpus']} CPUs, 1-min load {r['load_average_1min']['start']:.1f} -> "
          f"{r['load_average_1min']['end']:.1f})")


@subcommand("ingest", help="Ray Data ingest vs a single-process decode+augment loop (images/s per core)")
def ingest(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--data", required=True, help="prepared folder or URI (manifest.json + split folders)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--preset", default=None, help="augmentation preset (default: from the manifest's source)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first (Ray worker start-up, imports)")
    parser.add_argument("--eval", action="store_true", help="eval view only instead of weak + strong")
    parser.add_argument("--shuffle", choices=["full", "blocks", "none"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray start (default: all)")
    parser.add_argument("--address", default=None, help="Ray cluster to use (default: RAY_ADDRESS or a local start)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return run_ingest


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynloss benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (help_text, configure) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=configure(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # a missing or unprepared --data, an unknown preset: a message, not a traceback
        print(f"benchmark {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
