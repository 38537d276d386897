"""`dynloss benchmark epoch`: a whole `dynloss train` epoch against the same epoch over data held in memory.

Both paths run the same config, engine and components (`dynloss.epoch.run_epoch`, `dynloss.builder`): the Ray
path is `pipelines.train.run` (Ray Data shards -> Ray Train worker, checkpoints, MLflow), the in-memory path
the Ray-free runner `dynloss.local.train_local` (the split decoded once into uint8 tensors, batched
augmentation), so the ratio is what the Ray path costs on the same cores. Every epoch is evaluated on both
(the ranking pass, the meta set and evaluation are counted). Per epoch: on the Ray path the time between the
moments rank 0 logged consecutive epochs to MLflow (checkpointing included), in memory the time between
consecutive epoch ends; the first epoch carries start-up (Ray, workers, datasets) and the last one the Ray path's
label report (a pass over the train split) and final checkpoint: the per-epoch figure is the mean of the epochs
between them (hence 4 epochs by default), both are in the whole-process time. The Dynamic Loss gets one warm-up
epoch so that the later ones are meta epochs.

Target (issue 10): the Ray path <= 1.5x the in-memory time per epoch.

    python -m pipelines.benchmark epoch --config pipelines/configs/fashion_mnist_lt.yaml --json epoch.json
    python -m pipelines.benchmark epoch --config pipelines/configs/digits.yaml --losses ce --epochs 2
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

from pipelines.benchmarks import Runner, emit, subcommand

TARGET = 1.5


def _overrides(loss: str, epochs: int, tmp: str) -> list[str]:
    out = [f"loss.name={loss}", f"train.epochs={epochs}", "train.eval_every=1", f"run.storage_path={tmp}/runs",
           f"run.mlflow_uri=sqlite:///{tmp}/mlflow.db", f"run.name=bench-{loss}"]
    return out + (["dynamic.warmup_epochs=1"] if loss == "dynamic" else [])


def _steady(epoch_s: list[float]) -> float:
    """Mean of the epochs between the first (start-up) and the last (the Ray path's label report: a pass over the
    train split, and the final checkpoint), as many as there are."""
    middle = epoch_s[1:-1] or epoch_s[1:] or epoch_s
    return sum(middle) / len(middle)


def time_in_memory(cfg, device: str) -> dict:
    from dynloss.local import train_local

    t0 = time.perf_counter()
    res = train_local(cfg, device, log=lambda line: None)
    whole = time.perf_counter() - t0
    ends = [m["time/s"] for m in res.history]
    epoch_s = [b - a for a, b in zip([0.0] + ends, ends)]
    return {"whole_s": whole, "epoch_s": epoch_s, "steady_epoch_s": _steady(epoch_s),
            "top1": res.history[-1].get("eval/top1")}


def time_ray(cfg, address: str | None) -> dict:
    from mlflow.tracking import MlflowClient

    from pipelines.train import run

    t0 = time.perf_counter()
    res = run(cfg, address=address)
    whole = time.perf_counter() - t0
    history = sorted(MlflowClient(cfg.run.mlflow_uri).get_metric_history(res.run_id, "train/loss"),
                     key=lambda m: m.step)
    stamps = [m.timestamp / 1000 for m in history]
    epoch_s = [whole - (stamps[-1] - stamps[0])] + [b - a for a, b in itertools.pairwise(stamps)]
    return {"whole_s": whole, "epoch_s": epoch_s, "steady_epoch_s": _steady(epoch_s),
            "top1": res.metrics.get("eval/top1")}


def run_epoch_benchmark(args: argparse.Namespace) -> int:
    import ray
    import torch

    from dynloss.config import load_config
    from pipelines.ray_runtime import init_ray, shutdown_ray

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dynloss-bench-epoch-") as tmp:
        configs = {loss: load_config(args.config, [*args.set, *_overrides(loss, args.epochs, tmp)])
                   for loss in args.losses}  # every variant validated before anything runs
        owns_ray = not ray.is_initialized()
        try:
            init_ray(args.address)
            for loss, cfg in configs.items():
                ray_path = time_ray(cfg, args.address)
                memory = time_in_memory(cfg, device)
                rows.append({"loss": loss, "ray": ray_path, "in_memory": memory,
                             "ratio_epoch": ray_path["steady_epoch_s"] / memory["steady_epoch_s"],
                             "ratio_whole": ray_path["whole_s"] / memory["whole_s"]})
        finally:
            if owns_ray:
                shutdown_ray()
    report = {"benchmark": "epoch", "config": args.config, "set": args.set, "epochs": args.epochs,
              "device": device, "workers": configs[args.losses[0]].scaling.num_workers,
              "host_cpus": os.cpu_count(), "target_ratio_epoch": TARGET, "rows": rows,
              "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}}
    emit(report, print_epoch, args.json)
    return 0


def print_epoch(r: dict) -> None:
    print(f"epoch: {r['config']} {' '.join(r['set'])} - {r['epochs']} epochs, {r['workers']} Ray worker(s), "
          f"{r['device']}, {r['host_cpus']} CPUs (1-min load {r['load_average_1min']['start']:.1f} -> "
          f"{r['load_average_1min']['end']:.1f})")
    print(f"{'loss':<16}{'path':<11}{'whole s':>9}{'first s':>9}{'middle s':>10}{'last s':>8}{'top1':>8}")
    for row in r["rows"]:
        for name, key in (("ray", "ray"), ("in memory", "in_memory")):
            x = row[key]
            top1 = f"{x['top1']:.2%}" if x["top1"] is not None else "-"
            print(f"{row['loss']:<16}{name:<11}{x['whole_s']:>9.1f}{x['epoch_s'][0]:>9.1f}"
                  f"{x['steady_epoch_s']:>10.1f}{x['epoch_s'][-1]:>8.1f}{top1:>8}")
        met = "met" if row["ratio_epoch"] <= r["target_ratio_epoch"] else "NOT met"
        print(f"{row['loss']:<16}ray / in memory: per epoch {row['ratio_epoch']:.2f}x "
              f"(target <= {r['target_ratio_epoch']}x: {met}), whole process {row['ratio_whole']:.2f}x")


@subcommand("epoch", help="a whole dynloss train epoch (Ray) vs the same epoch over data in memory")
def epoch(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--config", required=True, help="experiment YAML (pipelines/configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--losses", nargs="+", default=["ce", "dynamic"], metavar="LOSS")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per run (the first carries start-up, the last the label report)")
    parser.add_argument("--device", default=None, help="of the in-memory run (default: cuda when present)")
    parser.add_argument("--address", default=None, help="Ray cluster to use (default: RAY_ADDRESS or a local start)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return run_epoch_benchmark
