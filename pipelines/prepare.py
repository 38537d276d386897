"""Prepare a dataset source into parquet shards plus a manifest (DESIGN.md sections 5 "Shards", 6, 7).

    python -m pipelines.prepare digits --out /tmp/dl_digits
    python -m pipelines.prepare fashion-mnist --out /tmp/dl_fmnist --imbalance 0.01 --noise sym:0.4 --seed 0
    python -m pipelines.prepare cifar10 --root ~/data --out file:///tmp/c10 --imbalance 0.01 --noise asym:0.2
    python -m pipelines.prepare webvision-mini --root /data/webvision --imagenet-val /data/imagenet/val \\
        --out s3://bucket/webvision-mini --row-order shuffled --workers 16   # or --ray: shard jobs as Ray tasks
    dynloss prepare animal10n --root /data/animal10n --out /tmp/a10n --strict
    dynloss prepare folder --root ~/my_images --out /tmp/mine --skip-empty-classes

Features:
  * sources read in their real formats (dynloss.data.sources); --root and --out may be local paths or
    pyarrow filesystem URIs;
  * --imbalance / --noise apply dynloss.noise to the train split, the clean label kept in true_label;
  * --row-order shuffled numbers the train rows in a seeded random order (default: source order, often class
    by class), which a stream that shuffles whole blocks needs (data.shuffle: blocks; dynloss.data.order);
  * a deterministic plan (OUT/_plan.json) written first, then one job per shard in a process pool
    (--workers) or as Ray tasks (--ray), with a progress bar;
  * re-runnable: shards this plan already finished (row count and sha256 checked) are kept, so a crashed
    run continues where it stopped; manifest.json is written last;
  * bad files (missing, or unreadable by Pillow: --verify decode|header|none) are left out and listed in
    OUT/rejected.csv with a count on screen, or fail the run with --strict;
  * folder: an empty class folder fails naming it, or with --skip-empty-classes the class is left out (a
    warning names it) and the other classes are numbered 0..K-1.
Fails (exit status 2, message on stderr) on a missing root (or a file given as a folder), an empty source or
class folder, an out-of-range label or an unknown class (naming the file and line), a bad option, or an OUT
holding a prepare with other settings (unless --overwrite).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time

import numpy as np

from dynloss.data import storage
from dynloss.data.manifest import MANIFEST, build_manifest, write_manifest
from dynloss.data.order import ROW_ORDERS
from dynloss.data.plan import (
    PLAN_FILE,
    VERIFY_LEVELS,
    SplitPlan,
    apply_protocols,
    estimate_png_bytes,
    load_plans,
    read_plan_doc,
    save_plans,
    scan_files,
    shard_bounds,
)
from dynloss.data.shards import STATE_DIR, ShardJob, ensure_shard
from dynloss.data.sources import DEFAULT_ROOTS, SOURCES, load_source
from dynloss.noise import CONVENTIONS, PROFILES, parse_noise

FORMAT_VERSION = 1
_PART = re.compile(r"^part-(\d{5})\.(parquet|json)$")
_TEMP = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynloss prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("source", choices=list(SOURCES), metavar="SOURCE", help="one of: " + " ".join(SOURCES))
    p.add_argument("--root", help="folder or URI holding the source files (defaults: "
                   + ", ".join(f"{k}={v}" for k, v in DEFAULT_ROOTS.items()) + "; digits needs none)")
    p.add_argument("--out", required=True, help="output folder or URI (file://, s3://, gs://)")
    p.add_argument("--splits", nargs="+", help="splits to prepare (default: all the source has)")
    p.add_argument("--imbalance", type=float, help="long-tail ratio rho = smallest/largest train class (e.g. 0.01)")
    p.add_argument("--imbalance-profile", default="exp", choices=PROFILES)
    p.add_argument("--noise", default="none", help="synthetic train label noise: sym:RATE, asym:RATE or none")
    p.add_argument("--noise-convention", default="prior", choices=CONVENTIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size-mb", type=float, default=64.0, help="target shard size (default 64)")
    p.add_argument("--row-order", default="source", choices=ROW_ORDERS,
                   help="train rows in source order (default; sources often list class by class) or in a seeded "
                   "random order, which data.shuffle: blocks needs (dynloss.data.order)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="shard jobs in parallel")
    p.add_argument("--ray", action="store_true",
                   help="run jobs as Ray tasks (started by pipelines.ray_runtime.init_ray, as in training: "
                   "RAY_ADDRESS or a local runtime, token auth on)")
    p.add_argument("--strict", action="store_true", help="fail on the first missing or unreadable file")
    p.add_argument("--verify", default="decode", choices=VERIFY_LEVELS,
                   help="how listed files are checked: full decode (default), Pillow verify() only, or existence only")
    p.add_argument("--imagenet-val", help="webvision*: ILSVRC2012 val folder, adds the split imagenet_val")
    p.add_argument("--lists", help="imagenet-lt: folder of ImageNet_LT_*.txt (default: --root)")
    p.add_argument("--skip-empty-classes", action="store_true",
                   help="folder: leave out a class whose folder has no images (with a warning) instead of failing; "
                   "the other classes are numbered 0..K-1")
    p.add_argument("--overwrite", action="store_true", help="replace a prepare with other settings in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        manifest = prepare(args, argv)
    except ValueError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, args.out, time.perf_counter() - started))
    return 0


def prepare(args: argparse.Namespace, argv: list[str]) -> dict:
    """Plan, write the shards, write the manifest; return the manifest."""
    settings = _settings(args)
    source = load_source(args.source, args.root, imagenet_val=args.imagenet_val, lists=args.lists,
                         skip_empty_classes=args.skip_empty_classes)
    for folder, cls in source.info.get("empty_class_folders", {}).items():
        what = (f"class {cls!r} left out" if cls in source.info["classes_left_out"]
                else f"class {cls!r} kept (it has train images)")
        print(f"prepare: warning: {folder}: empty class folder, {what} (--skip-empty-classes); "
              f"{source.num_classes} classes remain, numbered 0..{source.num_classes - 1}", file=sys.stderr)
    names = _splits(args, source)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for n in names:
        digest.update(f"{n}:{source.splits[n].digest()}".encode())
    fingerprint = digest.hexdigest()[:32]
    fs, out = storage.resolve(args.out)
    doc = read_plan_doc(args.out)
    if doc is not None and doc["fingerprint"] != fingerprint and not args.overwrite:
        raise ValueError(f"{args.out} holds a prepare with other settings ({PLAN_FILE}: {doc['settings']}); "
                         "use another --out, or add --overwrite to replace it")
    storage.delete_file(fs, storage.join(out, MANIFEST))  # rewritten last: never describes half-written shards
    with Runner(args.workers, args.ray, progress=not args.no_progress) as runner:
        plans = _reuse_plan(args.out, doc, fingerprint)
        if plans is None:
            if doc is not None:
                _clear(fs, out, doc)
            plans = {n: _plan_split(runner, source, n, settings, args) for n in names}
            _write_rejected(fs, out, plans)
            save_plans(args.out, plans, fingerprint, settings)
        receipts = _write_shards(runner, source, plans, fingerprint, args.out)
    _remove_stale(fs, out, {n: len(p.bounds) for n, p in plans.items()})
    manifest = build_manifest(source, plans, receipts, settings, argv)
    manifest["fingerprint"] = fingerprint
    manifest["kept_shards"] = sum(r.get("kept", False) for rs in receipts.values() for r in rs)
    write_manifest(args.out, manifest)
    return manifest


def _reuse_plan(location: str, doc: dict | None, fingerprint: str) -> dict | None:
    """The saved plan when it was made from the same source and settings (a re-run skips the scan)."""
    if doc is None or doc.get("fingerprint") != fingerprint:
        return None
    try:
        return load_plans(location, doc)
    except (OSError, KeyError, ValueError):  # its row tables were lost: plan again
        return None


def _settings(args) -> dict:
    if args.imbalance is not None and not 0.0 < args.imbalance <= 1.0:
        raise ValueError(f"--imbalance {args.imbalance}: expected 0 < RHO <= 1 (smallest/largest class, e.g. 0.01)")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: expected 1 or more")
    if args.shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb {args.shard_size_mb}: expected a positive size in MB")
    if args.skip_empty_classes and args.source != "folder":
        raise ValueError(f"--skip-empty-classes: only the folder source has class folders; "
                         f"leave it out for {args.source}")
    try:
        noise = list(parse_noise(args.noise))
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith("--noise") else f"--noise {args.noise!r}: {e}") from None
    return {
        "format": FORMAT_VERSION,
        "source": args.source,
        "root": args.root or DEFAULT_ROOTS.get(args.source),
        "imbalance": args.imbalance,
        "imbalance_profile": args.imbalance_profile,
        "noise": noise,
        "noise_convention": args.noise_convention,
        "seed": args.seed,
        "shard_size_mb": args.shard_size_mb,
        "verify": args.verify,
        "imagenet_val": args.imagenet_val,
        "lists": args.lists,
        "splits": args.splits,
        # only when not the default, so the fingerprint of a prepare made before the option existed is unchanged
        **({"row_order": args.row_order} if args.row_order != "source" else {}),
    }


def _splits(args, source) -> list[str]:
    names = args.splits or list(source.splits)
    unknown = [n for n in names if n not in source.splits]
    if unknown:
        raise ValueError(f"--splits {' '.join(unknown)}: {args.source} has splits {', '.join(source.splits)}")
    return names


def _plan_split(runner: Runner, source, name: str, settings: dict, args) -> SplitPlan:
    split = source.splits[name]
    if name == "train":
        keep, labels, truth = apply_protocols(
            split, source.num_classes, source.name, settings["imbalance"], settings["imbalance_profile"],
            tuple(settings["noise"]), settings["noise_convention"], settings["seed"])
    else:
        keep, labels, truth = np.arange(len(split), dtype=np.int64), split.labels.copy(), split.true_labels.copy()
    rejected = []
    if split.kind == "file":
        paths = [split.paths[i] for i in keep]
        step = max(1, min(1000, -(-len(paths) // (4 * runner.workers))))
        chunks = [paths[i : i + step] for i in range(0, len(paths), step)]
        try:
            results = runner.map(scan_files, [(split.base, c, settings["verify"], args.strict) for c in chunks],
                                 [len(c) for c in chunks], f"scan {name}")
        except ValueError as e:  # --strict: the first bad file, named with its reason
            raise ValueError(str(e)) from None
        results = [r for chunk in results for r in chunk]
        ok = np.array([problem is None for _, problem in results], dtype=bool)
        rejected = [(storage.display(split.base, p), problem)
                    for p, (_, problem) in zip(paths, results) if problem is not None]
        nbytes = np.array([size for size, _ in results], dtype=np.int64)[ok]
        keep, labels, truth = keep[ok], labels[ok], truth[ok]
    else:
        nbytes = np.full(len(keep), estimate_png_bytes(split.images, keep), dtype=np.int64)
    if not len(keep):
        shown = "; ".join(f"{path}: {reason}" for path, reason in rejected[:3])
        more = f"; and {len(rejected) - 3} more" if len(rejected) > 3 else ""
        raise ValueError(f"split {name}: no usable rows left, all {len(rejected)} files were rejected ({shown}{more})"
                         if rejected else f"split {name}: no usable rows left")
    row_order = settings.get("row_order", "source") if name == "train" else "source"  # only train is reordered
    if row_order == "shuffled":  # ids dense over a seeded permutation
        perm = np.random.default_rng([settings["seed"], 0x0D3E]).permutation(len(keep))
        keep, labels, truth, nbytes = keep[perm], labels[perm], truth[perm], nbytes[perm]
    bounds = shard_bounds(nbytes, int(settings["shard_size_mb"] * (1 << 20)))
    return SplitPlan(name, split.kind, keep, labels, truth, nbytes, bounds, rejected, row_order)


def _write_shards(runner: Runner, source, plans: dict, fingerprint: str, out: str) -> dict[str, list[dict]]:
    jobs, weights, where = [], [], []
    for name, p in plans.items():
        split = source.splits[name]
        for index, (a, b) in enumerate(p.bounds):
            jobs.append(_ShardArgs(out, name, index, a, b, p, split, fingerprint))
            weights.append(b - a)
            where.append(name)
    results = runner.map(ensure_shard, jobs, weights, "write shards")
    receipts = {n: [] for n in plans}
    for name, r in zip(where, results):
        receipts[name].append(r)
    return receipts


class _ShardArgs:
    """Builds a ShardJob only when submitted, so at most a window of image slices is in memory."""

    def __init__(self, out, name, index, a, b, plan, split, fingerprint):
        self.args = (out, name, index, a, b, plan, split, fingerprint)

    def __call__(self) -> tuple:
        out, name, index, a, b, p, split, fp = self.args
        rows = p.src[a:b]
        job = ShardJob(out, name, index, a, p.labels[a:b], p.true_labels[a:b], fp)
        if split.kind == "array":
            job.images = split.images[rows]
        else:
            job.base, job.paths = split.base, [split.paths[i] for i in rows]
        return (job,)


class Runner:
    """Runs independent jobs, results in submission order: in this process (workers=1), in a process pool,
    or as Ray tasks. At most 2*workers jobs are in flight; on a failure the rest are cancelled, the running
    ones finish (their shards count for the resume) and the error is raised."""

    def __init__(self, workers: int, use_ray: bool = False, progress: bool = True):
        self.workers, self.use_ray, self.progress = workers, use_ray, progress
        self._pool = None
        self._remote = {}
        self._started_ray = False
        if use_ray:
            try:
                import ray

                from pipelines.ray_runtime import init_ray
            except ImportError as e:
                raise ValueError("--ray needs ray installed (pip install 'ray[data]'); leave it out to use processes") from e
            if not ray.is_initialized():
                # the same start as training: RAY_ADDRESS (or `ray start` on this node) means a cluster, otherwise
                # a local runtime; token authentication on either way. On a cluster, --root and --out must be
                # reachable from every node (shared storage or URIs).
                init_ray(log_to_driver=False)
                self._started_ray = True
            self._ray = ray

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._started_ray:
            from pipelines.ray_runtime import shutdown_ray

            shutdown_ray()

    def map(self, fn, arg_list: list, weights: list[int], desc: str) -> list:
        from tqdm import tqdm

        results = [None] * len(arg_list)
        bar = tqdm(total=sum(weights), desc=desc, unit="img", disable=None if self.progress else True)

        def args_of(i: int) -> tuple:  # a callable builds its arguments only when the job is submitted
            return arg_list[i]() if callable(arg_list[i]) else arg_list[i]

        try:
            if not self.use_ray and (self.workers <= 1 or len(arg_list) <= 1):
                for i in range(len(arg_list)):
                    results[i] = fn(*args_of(i))
                    bar.update(weights[i])
                return results
            pending, todo = {}, iter(range(len(arg_list)))
            try:
                while True:
                    while len(pending) < 2 * self.workers and (i := next(todo, None)) is not None:
                        pending[self._submit(fn, args_of(i))] = i
                    if not pending:
                        return results
                    for handle in self._wait(pending):
                        i = pending.pop(handle)
                        results[i] = self._result(handle)
                        bar.update(weights[i])
            except BaseException:
                self._cancel(pending)
                raise
        finally:
            bar.close()

    def _submit(self, fn, args):
        if self.use_ray:
            if fn not in self._remote:
                self._remote[fn] = self._ray.remote(fn)
            return self._remote[fn].remote(*args)
        if self._pool is None:
            # spawn: the parent holds pyarrow/torch threads, which fork does not copy safely
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.submit(fn, *args)

    def _wait(self, pending):
        if self.use_ray:
            return self._ray.wait(list(pending), num_returns=1)[0]
        return cf.wait(pending, return_when=cf.FIRST_COMPLETED).done

    def _result(self, handle):
        if not self.use_ray:
            return handle.result()
        try:
            return self._ray.get(handle)
        except self._ray.exceptions.RayTaskError as e:
            # a job's bad-input error (a bad file under --strict) reads as its own message, not as the task's
            # traceback; other errors keep Ray's report, which holds the remote traceback
            if isinstance(e.cause, ValueError):
                raise e.cause from None
            raise

    def _cancel(self, pending):
        for handle in pending:
            if self.use_ray:
                self._ray.cancel(handle)
            else:
                handle.cancel()
        if not self.use_ray and self._pool is not None:
            cf.wait([h for h in pending if not h.cancelled()])


def _write_rejected(fs, out: str, plans: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["split", "path", "reason"])
    for name, p in plans.items():
        w.writerows([name, path, reason] for path, reason in p.rejected)
    storage.write_atomic(fs, storage.join(out, "rejected.csv"), buf.getvalue().encode())


def _clear(fs, out: str, doc: dict) -> None:
    """Remove what an earlier prepare (described by `doc`) wrote, before writing a different one."""
    for name in (MANIFEST, PLAN_FILE, "rejected.csv"):
        storage.delete_file(fs, storage.join(out, name))
    if storage.is_dir(fs, storage.join(out, STATE_DIR)):
        fs.delete_dir(storage.join(out, STATE_DIR))
    _remove_stale(fs, out, {split: 0 for split in doc.get("splits", {})})


def _remove_stale(fs, out: str, shards: dict[str, int]) -> None:
    """Delete shards/receipts numbered beyond `shards[split]` (left by an earlier, larger plan) and temp files
    of crashed writes."""
    for name, count in shards.items():
        for folder in (storage.join(out, name), storage.join(out, STATE_DIR, name)):
            if not storage.is_dir(fs, folder):
                continue
            for info in fs.get_file_info(storage.pafs.FileSelector(folder)):
                m = _PART.match(info.base_name)
                if (m and int(m.group(1)) >= count) or _TEMP.match(info.base_name):
                    fs.delete_file(info.path)
    for folder in (out, storage.join(out, STATE_DIR)):
        if storage.is_dir(fs, folder):
            for info in fs.get_file_info(storage.pafs.FileSelector(folder)):
                if _TEMP.match(info.base_name):
                    fs.delete_file(info.path)


def summary(manifest: dict, out: str, seconds: float) -> str:
    lines = [f"prepared {manifest['source']} -> {out} in {seconds:.1f} s"]
    for name, s in manifest["splits"].items():
        noise = "" if s["noise_rate"] is None else f", {100 * s['noise_rate']:.1f}% labels wrong"
        lines.append(f"  {name}: {s['rows']} rows, {len(s['shards'])} shards, {s['bytes'] / 1e6:.1f} MB{noise}")
    t = manifest["totals"]
    lines.append(f"  total: {t['rows']} rows, {t['shards']} shards ({manifest['kept_shards']} kept from an earlier run), "
                 f"{t['bytes'] / 1e6:.1f} MB")
    if t["rejected"]:
        lines.append(f"  rejected {t['rejected']} files (missing or unreadable): see {storage.display(out, 'rejected.csv')}")
    else:
        lines.append("  rejected 0 files")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
