"""`dynloss benchmark ingest`: images/s per CPU core of the Ray Data path against a plain single-process loop.

The Ray path is the full training ingest (`pipelines.data.build_dataset` as `dynloss train` builds it: a split
held in the object store or read from parquet (`--stream` forces the read; `source` in the output), id filter,
shuffle, decode + the views asked for, iteration to the consumer); the baseline a plain single-process decode +
augment loop over the same shards (`dynloss.data.batches.iter_local_batches`, one torch thread); both measured in
the same run, and their ratio. Both end where a training loop takes over: uint8 views in a batch. What the loop
does next, the same for both (`Preset.normalise`, on the GPU when there is one), is timed on the single-process
path's batches (one torch thread), left out of its time, and reported per image (`normalise_us_per_image`: what a
CPU trainer pays on top). Per core: the single-process loop counts one core; the Ray path counts the CPUs of the Ray
runtime (`--num-cpus` for a local start; `--cores 1 2 ...` repeats the Ray path on a fresh local runtime of each
size, to show how the rate grows with cores). Warm-up epochs (worker start-up, imports) run first and are
reported separately, not in the rate. The timed epochs alternate between the two paths (single process, Ray,
single process, Ray, ...; with `--cores`, the single-process epochs of every point count towards its rate): a
shared machine's speed drifts by tens of percent over seconds, and back-to-back blocks of one path then the other
would put that drift into the ratio. `--jpeg N` generates N 224-px JPEGs and prepares them as shards (the
ImageNet-style path: JPEG decode + RandomResizedCrop), instead of `--data`.

`--device cuda` adds a third path: the same single-process loop decoding and making the views on that device
(`dynloss.data.batches.views_on_device`: the JPEGs by nvJPEG; what `data.decode_on: device` does in each training
worker), timed to the device's last kernel, one host thread; `ratio_device` is its rate over the CPU loop's. It
needs no Ray: `--no-ray` leaves the Ray path out (a machine without Ray, such as the GPU machine of docs/performance.md).

Target (issue 10): the Ray path >= 0.9x the single-process loop per core, growing with cores.

    python -m pipelines.prepare digits --out data/digits
    python -m pipelines.benchmark ingest --data data/digits --split train --preset digits --epochs 2 --json ingest.json
    python -m pipelines.benchmark ingest --jpeg 2000 --cores 1 2 --json ingest_jpeg.json
    python -m pipelines.benchmark ingest --jpeg 2000 --device cuda --no-ray --epochs 3
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from pipelines.benchmarks import Runner, emit, subcommand


def _consume(batches, normalise: Callable | None) -> tuple[int, int, float]:
    """Drain an iterator of batches as a training loop would; with ``normalise``, also normalise every view (one
    torch thread). Returns (images, corrupt, seconds spent normalising)."""
    import torch

    from dynloss.data.transforms import TRAIN_VIEWS

    images = corrupt = 0
    spent = 0.0
    for batch in batches:
        images += int(batch["id"].shape[0])
        corrupt += int(batch["corrupt"])
        if normalise is not None:
            # what is in force now, not before the first batch: the single-process epoch sets one thread when it
            # starts, and restoring the count from before it let its decode run on two from the second batch on
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            for key in (*TRAIN_VIEWS, "x"):  # the train views or the eval view
                if key in batch:
                    normalise(batch[key])
            spent += time.perf_counter() - t0
            torch.set_num_threads(threads)
    return images, corrupt, spent


def _path() -> dict:
    return {"images": 0, "corrupt": 0, "seconds": 0.0, "epoch_seconds": [], "warmup_seconds": 0.0}


def _timed_epoch(r: dict, make_epoch: Callable[[int], object], epoch: int, *, warmup: bool = False,
                 normalise: Callable | None = None) -> None:
    """One epoch of a path, added to its record ``r`` (a warm-up epoch only to its warm-up time); the time spent
    in ``normalise`` is kept apart (``normalise_seconds``), not in the epoch's."""
    t0 = time.perf_counter()
    n, c, spent = _consume(make_epoch(epoch), normalise)
    seconds = time.perf_counter() - t0 - spent
    if warmup:
        r["warmup_seconds"] += seconds
        return
    r["images"], r["corrupt"], r["seconds"] = r["images"] + n, r["corrupt"] + c, r["seconds"] + seconds
    r["epoch_seconds"].append(seconds)
    if normalise is not None:
        r["normalise_seconds"] = r.get("normalise_seconds", 0.0) + spent


def generate_jpegs(out: str, n: int, size: int = 224, classes: int = 10, seed: int = 0) -> str:
    """``n`` photo-like size x size JPEGs (smooth colour fields + noise, quality 90, ~15-25 KB) in ``classes``
    class folders, prepared as shards by ``dynloss prepare folder --row-order shuffled`` (as the configs for large
    JPEG data prepare, so ``--shuffle blocks`` can stream it: `dynloss.data.order`); returns the prepared folder."""
    import numpy as np
    from PIL import Image

    from pipelines import prepare

    rng = np.random.default_rng(seed)
    root = os.path.join(out, "jpeg_src")
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        folder = os.path.join(root, f"class{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        a, b, c = rng.uniform(1, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + k) for k in rng.uniform(0, 6, 3)], -1) * 80 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape) * c, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    prepared = os.path.join(out, "jpeg")
    if prepare.main(["folder", "--root", root, "--out", prepared, "--row-order", "shuffled", "--workers", "1",
                     "--no-progress"]) != 0:
        raise ValueError(f"could not prepare the generated JPEGs in {root}")
    return prepared


def _rates(r: dict) -> dict:
    r["images_per_s"] = r["images"] / r["seconds"]
    r["images_per_s_per_core"] = r["images_per_s"] / r["cores"]
    return r


def run_ingest(args: argparse.Namespace) -> int:
    import tempfile

    if (args.data is None) == (args.jpeg is None):
        raise ValueError("give --data DIR (prepared shards) or --jpeg N (generate N 224-px JPEGs), one of them")
    if args.jpeg is None:
        return _ingest(args, args.data)
    with tempfile.TemporaryDirectory(prefix="dynloss-bench-jpeg-") as tmp:
        return _ingest(args, generate_jpegs(tmp, args.jpeg))


def _ingest(args: argparse.Namespace, data: str) -> int:
    import torch

    from dynloss.data.batches import iter_local_batches, read_rows, resolve_preset
    from dynloss.data.manifest import read_manifest
    from dynloss.data.transforms import preset_for_source

    load_start = os.getloadavg()[0]
    train = not args.eval
    shuffle = args.shuffle or ("full" if train else "none")
    preset = resolve_preset(args.preset or preset_for_source(read_manifest(data).get("source", "")), data)
    table = read_rows(data, args.split)  # read once, as a single-process loader would keep it in memory

    def local_epoch(e: int, device: str | None = None):
        # Baseline: one process, one core (torch would otherwise spread small ops over every core), while it runs.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from iter_local_batches(data, args.split, preset, train=train, batch_size=args.batch_size,
                                          seed=args.seed, epoch=e, table=table, views=args.views,
                                          decode_device=device)
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)  # the epoch ends with the device's last kernel
        finally:
            torch.set_num_threads(threads)

    def single_process_epochs(e: int, warmup: bool = False) -> None:
        """One epoch of the single-process loop, and of the same loop decoding on ``--device`` when asked."""
        _timed_epoch(local, local_epoch, e, warmup=warmup, normalise=None if warmup else preset.normalise)
        if on_device is not None:
            _timed_epoch(on_device, lambda e: local_epoch(e, args.device), e, warmup=warmup)

    local = _path()
    local["cores"] = 1
    on_device = None
    if args.device is not None:
        on_device = {**_path(), "cores": 1, "device": str(torch.device(args.device))}
    for e in range(args.warmup):
        single_process_epochs(e, warmup=True)
    if args.no_ray:
        for e in range(args.warmup, args.warmup + args.epochs):
            single_process_epochs(e)
        scaling = []
    else:
        scaling = _ray_paths(args, data, preset, train, shuffle, single_process_epochs)
    _rates(local)
    if on_device is not None:
        _rates(on_device)
    remote = scaling[-1] if scaling else None
    result = {
        "benchmark": "ingest", "data": "generated 224-px JPEGs" if args.jpeg else data, "images_generated": args.jpeg,
        "split": args.split, "preset": preset.name,
        "views": "+".join(args.views) if train else "eval", "batch_size": args.batch_size, "epochs": args.epochs,
        "warmup_epochs": args.warmup, "shuffle": shuffle, "source": None, "ray_decode_rows": None,
        "single_process": local, "single_process_on_device": on_device, "ray_data": remote,
        "ray_data_by_cores": scaling,
        "ratio_per_core": remote["images_per_s_per_core"] / local["images_per_s_per_core"] if remote else None,
        "ratio_total": remote["images_per_s"] / local["images_per_s"] if remote else None,
        "ratio_device": on_device["images_per_s"] / local["images_per_s"] if on_device else None,
        "normalise_us_per_image": 1e6 * local["normalise_seconds"] / local["images"],
        "host_cpus": os.cpu_count(),
        # other processes on the host compete for the same cores; a load above host_cpus deflates both rates
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }
    if remote is not None:
        from pipelines.data import IN_MEMORY_MB, decode_rows, is_held

        held = is_held(data, args.split, shuffle, 0 if args.stream else IN_MEMORY_MB)
        result.update(source="held" if held else "streamed", ray_decode_rows=decode_rows(preset, train, args.views))
    emit(result, _print_ingest, args.json)
    return 0


def _ray_paths(args: argparse.Namespace, data: str, preset, train: bool, shuffle: str,
               single_process_epochs: Callable[[int], None]) -> list[dict]:
    """The Ray path on each ``--cores`` point (or the runtime given), its timed epochs alternating with the
    single-process ones (and those on the device); the Ray path's record per point."""
    import ray

    from pipelines.data import IN_MEMORY_MB, build_dataset, iter_train_batches
    from pipelines.ray_runtime import init_ray, shutdown_ray

    in_memory_mb = 0 if args.stream else IN_MEMORY_MB
    scaling = []
    for cores in args.cores or [None]:
        if cores is not None:  # a fresh local runtime of that many CPUs for each point
            shutdown_ray()
            init_ray("local", num_cpus=cores)
        else:
            init_ray(args.address, num_cpus=args.num_cpus)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # the Ray path decodes in calls of its own size (decode_rows) and re-batches; the plain loop decodes per batch
        ds = build_dataset(data, args.split, preset=preset, train=train, seed=args.seed, shuffle=shuffle,
                           views=args.views, in_memory_mb=in_memory_mb)

        def ray_epoch(e: int, ds=ds):
            return iter_train_batches(ds, batch_size=args.batch_size, device="cpu", epoch=e)

        remote = _path()
        for e in range(args.warmup):
            _timed_epoch(remote, ray_epoch, e, warmup=True)
        for e in range(args.warmup, args.warmup + args.epochs):  # alternating, so all see the same machine
            single_process_epochs(e)
            _timed_epoch(remote, ray_epoch, e)
        remote["cores"] = float(ray.cluster_resources().get("CPU", 1))
        scaling.append(_rates(remote))
    if args.cores:
        shutdown_ray()
    return scaling


def _print_ingest(r: dict) -> None:
    print(f"ingest: {r['data']} split={r['split']} preset={r['preset']} views={r['views']} "
          f"batch={r['batch_size']} epochs={r['epochs']} (+{r['warmup_epochs']} warm-up) shuffle={r['shuffle']}"
          + (f" source={r['source']}" if r["source"] else ""))
    print(f"{'path':<16}{'images':>8}{'corrupt':>9}{'seconds':>9}{'images/s':>10}{'cores':>7}{'images/s/core':>15}"
          f"{'warm-up s':>11}")
    rows = [("single-process", r["single_process"])] + [("ray data", x) for x in r["ray_data_by_cores"]]
    if r["single_process_on_device"]:
        rows.insert(1, (f"on {r['single_process_on_device']['device']}", r["single_process_on_device"]))
    for name, x in rows:
        print(f"{name:<16}{x['images']:>8}{x['corrupt']:>9}{x['seconds']:>9.2f}{x['images_per_s']:>10.0f}"
              f"{x['cores']:>7g}{x['images_per_s_per_core']:>15.0f}{x['warmup_seconds']:>11.2f}")
    if r["ratio_per_core"] is not None:
        print(f"ratio ray data / single-process: per core {r['ratio_per_core']:.2f}, total {r['ratio_total']:.2f}")
    if r["ratio_device"] is not None:
        print(f"ratio decoding on {r['single_process_on_device']['device']} / on the CPU (one host thread each): "
              f"{r['ratio_device']:.2f}")
    print(f"(host: {r['host_cpus']} CPUs, 1-min load {r['load_average_1min']['start']:.1f} -> "
          f"{r['load_average_1min']['end']:.1f})")
    print(f"then normalising the uint8 views (the training loop's first step, the same for both; on the GPU when there "
          f"is one): {r['normalise_us_per_image']:.1f} us per image on one CPU thread")


@subcommand("ingest", help="Ray Data ingest vs a single-process decode+augment loop (images/s per core)")
def ingest(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--data", default=None, help="prepared folder or URI (manifest.json + split folders)")
    parser.add_argument("--jpeg", type=int, default=None, metavar="N",
                        help="instead of --data: generate N 224-px JPEGs, prepare them (`prepare folder`), use them")
    parser.add_argument("--cores", type=int, nargs="+", default=None, metavar="K",
                        help="a fresh local Ray runtime of K CPUs per value (e.g. 1 2): how the rate grows with cores")
    parser.add_argument("--split", default="train")
    parser.add_argument("--preset", default=None, help="augmentation preset (default: from the manifest's source)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="batch handed to the consumer; the plain loop decodes per batch, the Ray path in calls of "
                             "pipelines.data.decode_rows")
    parser.add_argument("--epochs", type=int, default=1,
                        help="timed epochs of each path (and of each --cores point), the two paths alternating")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed epochs first: Ray worker start-up and imports, then two more epochs that still "
                             "run slower than the ones after (docs/performance.md section 2)")
    parser.add_argument("--views", nargs="+", choices=["weak", "strong"], default=["weak"],
                        help="train views to make (a config's train stream makes data.train_view only: weak)")
    parser.add_argument("--eval", action="store_true", help="the eval view instead of train views")
    parser.add_argument("--shuffle", choices=["full", "blocks", "none"], default=None)
    parser.add_argument("--stream", action="store_true",
                        help="stream the split from parquet even when it is small enough to be held in memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray start (default: all)")
    parser.add_argument("--address", default=None, help="Ray cluster to use (default: RAY_ADDRESS or a local start)")
    parser.add_argument("--device", default=None,
                        help="also time the single-process loop decoding on this device (cuda: nvJPEG), one host thread")
    parser.add_argument("--no-ray", action="store_true", help="leave the Ray path out (a machine without Ray)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return run_ingest
