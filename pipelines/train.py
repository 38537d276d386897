"""Train with the Dynamic Loss (or any robust loss) on Ray Train: DDP meta-learning, checkpoints, resume, MLflow.

    python -m pipelines.train --config pipelines/configs/digits.yaml
    dynloss train --config pipelines/configs/fashion_mnist_lt.yaml --set loss.name=ce --set run.name=fmnist-ce
    ray job submit --working-dir . -- python -m pipelines.train --config pipelines/configs/cifar10_lt_noisy.yaml \\
        --mlflow-uri http://mlflow-host:5000          # on a running cluster (see pipelines/ray_runtime.py for auth)

What it does, top to bottom (DESIGN.md section 5, "Train"):
  1. validates the whole config (dynloss.config; every error at once, before Ray starts), runs
     ``pipelines.prepare`` first when ``data.prepare`` is set and the shards are missing;
  2. connects to the cluster (``--address`` / RAY_ADDRESS / ``ray job submit``) or starts an embedded local
     runtime, token authentication on (pipelines.ray_runtime);
  3. opens (or, for a resubmitted ``run.name``, reopens) the MLflow run and logs the resolved config;
  4. declares the Ray Data pipelines (pipelines.data: train stream with the view it trains on, the train split's
     un-augmented view for the ranking pass, the eval split) and runs a ``TorchTrainer`` (Ray Train V2):
     N workers, DDP over gloo (CPU) or NCCL (GPU), ``train_loop`` per worker;
  5. logs the final checkpoint and ``label_report.parquet`` to MLflow and prints the final metrics.
Per epoch each worker (pipelines.train_worker) runs ``dynloss.epoch`` over its Ray Data shards, the same epoch
the Ray-free runner ``dynloss.local`` runs: ranking pass -> rank table + meta set (Dynamic Loss, after warm-up) ->
training with the DDP meta hooks -> fine-tune on the meta set -> evaluation every ``train.eval_every`` epochs
(top-1/5, many/medium/few-shot, trust of clean vs noisy labels, a warning on a collapse) -> a checkpoint directory
reported with the metrics by every worker -> rank 0 logs to MLflow and prints a progress line.

Under ``ray job submit`` the job runs in a temporary copy of the working directory: give ``data.path``,
``run.storage_path`` absolute paths or URIs every node can reach (NFS, s3://, gs://) and ``--mlflow-uri`` a
tracking server, or the shards, checkpoints and the SQLite store end up in that temporary copy.

Resume: ``run.max_failures`` restarts a failed run from its last checkpoint; running the same command again
(same ``run.name`` and ``run.storage_path``) continues from the last checkpoint of that run, in the same
MLflow run (pipelines.resume): a finished run says so and exits at once, ``--set train.epochs=N`` extends it
with the lr schedule rebuilt for N epochs, any other change of the config is refused with the changed keys,
``--restart`` moves the old run aside and starts afresh. Every exit path ends the MLflow run (FINISHED, FAILED,
KILLED on Ctrl-C). ``--verbose`` shows Ray Train's INFO logs (its per-report "Reporting training result" lines
included); without it the console has the progress lines and the final table.
Fault drills (``DYNLOSS_FAIL_AT_EPOCH``, docs/reliability.md): ``K`` makes every worker raise once at the start of
epoch K; ``K:kill`` SIGKILLs the process of the last worker once, a second into epoch K; several drills are
separated by commas (``1:kill,2``).
Exit status: 0 done, 2 invalid config (nothing started), 1 training failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

from dynloss.config import Config, ConfigError, check_dataset, load_config, manifest_exists, resolve_paths
from dynloss.data import storage
from dynloss.report import compare_table, final_line
from pipelines import gc_tuning

FAIL_ENV = "DYNLOSS_FAIL_AT_EPOCH"
DRILLS = ("raise", "kill")
KILL_AFTER_S = 1.0  # a ``kill`` drill lands this far into its epoch: mid-ranking-pass or mid-training
MIN_FREE_MB = 64  # refuse to start on a disk this full: the first checkpoint would fail after an epoch of work
EQUAL_SPLIT = ("train",)  # lockstep DDP needs the same number of batches on every worker


@dataclass
class TrainResult:
    metrics: dict
    checkpoint: str | None
    run_id: str | None
    run_dir: str


# ------------------------------------------------------------------------------------------------ driver
def ensure_prepared(cfg: Config) -> None:
    """Run pipelines.prepare for ``data.prepare`` when ``data.path`` has no manifest yet."""
    p = cfg.data.prepare
    if p is None or manifest_exists(cfg.data.path):
        return
    from pipelines import prepare

    argv = [p.source, "--out", cfg.data.path, "--noise", p.noise, "--noise-convention", p.convention,
            "--seed", str(p.seed), "--imbalance-profile", p.imbalance_profile]
    argv += ["--root", p.root] if p.root else []
    argv += ["--imbalance", str(p.imbalance)] if p.imbalance is not None else []
    argv += [*p.args, *([] if sys.stderr.isatty() else ["--no-progress"])]
    print(f"data.prepare: python -m pipelines.prepare {' '.join(argv)}", flush=True)
    if prepare.main(argv) != 0:
        raise ConfigError([f"data.prepare: `python -m pipelines.prepare {' '.join(argv)}` failed (message above)"])


def build_datasets(cfg: Config, manifest: dict) -> dict:
    """train (the view the config trains on, ``data.train_view``; new order every epoch), rank (train split, eval
    view), eval. Meta batches, and the rank and eval passes small enough to be kept (``in_worker_passes``), are
    decoded by the workers themselves (``pipelines.train_worker``): no dataset is built for those. With
    ``data.decode_on: device`` the train stream's rows stay encoded: the workers decode them too."""
    from dynloss.builder import build_preset
    from pipelines.data import build_dataset
    from pipelines.train_worker import PASS_SPLITS, in_worker_passes, pass_split

    common = {"preset": build_preset(cfg, manifest)[0],
              "preset_params": cfg.data.preset_params, "num_cpus": cfg.data.decode_cpus,
              "concurrency": cfg.data.decode_concurrency, "in_memory_mb": cfg.data.in_memory_mb}
    in_worker = in_worker_passes(cfg, manifest)
    return {
        "train": build_dataset(cfg.data.path, "train", train=True, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                               views=(cfg.data.train_view,), decode=cfg.data.decode_on == "ray_data", **common),
        **{name: build_dataset(cfg.data.path, pass_split(cfg, name), train=False, shuffle="none", **common)
           for name in PASS_SPLITS if name not in in_worker},
    }


def _exact_split_config(preserve_order: bool = False):
    from ray.train import DataConfig

    class ExactSplit(DataConfig):
        """``train`` split equally (DDP steps in lockstep; a few rows may be dropped per epoch); ``rank`` and
        ``eval`` split with ``equal=False`` so every row is seen exactly once (a ranking pass must rank every
        sample, an evaluation must count every test image); the rest is DataConfig.configure's own recipe."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            equal = {k: v for k, v in datasets.items() if k in EQUAL_SPLIT}
            out = super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
            hints = worker_node_ids if getattr(self, "_enable_shard_locality", True) else None
            for name, ds in datasets.items():
                if name in EQUAL_SPLIT:
                    continue
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                resolve = getattr(self, "_resolve_execution_options", None)
                ds.context.execution_options = resolve(name) if resolve else DataConfig.default_ingest_options()
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i][name] = split
            return out

    if not preserve_order:
        return ExactSplit()
    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # data.shuffle: none -> the stream in shard (id) order, as dynloss.local reads it
    return ExactSplit(execution_options=options)


def _check_storage(location: str) -> None:
    """run.storage_path can take a file (a probe is written and removed) with room to spare (local paths: at
    least MIN_FREE_MB free), before anything trains; ConfigError naming the path otherwise."""
    import shutil

    fs, path = storage.resolve(location)
    probe = storage.join(path, f".dynloss-write-probe-{os.getpid()}")
    try:
        fs.create_dir(path, recursive=True)
        storage.write_atomic(fs, probe, b"ok")
        storage.delete_file(fs, probe)
    except OSError as e:
        raise ConfigError([f"run.storage_path: cannot write checkpoints to {location} ({e}); give a writable "
                           "folder or URI (--set run.storage_path=...)"]) from None
    if not storage.is_uri(location):
        free = shutil.disk_usage(path).free // (1 << 20)
        if free < MIN_FREE_MB:
            raise ConfigError([f"run.storage_path: {location} has {free} MB free, less than the {MIN_FREE_MB} MB a "
                               "run's checkpoints need; free some space or point run.storage_path elsewhere"])


def _use_gpu(setting) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(setting)


def run(cfg: Config, *, address: str | None = None, fail_at_epoch: str | int | None = None, callbacks: Sequence = (),
        tags: Mapping[str, str] | None = None, verbose: bool = False, restart: bool = False,
        verify: bool = False) -> TrainResult:
    """Prepare if asked, start/connect Ray, train, log; returns the final metrics and checkpoint.

    A Tune trial (pipelines.tune) runs this same function with Tune's report callback and the MLflow tags that
    make its run a child of the sweep's run (``mlflow.parentRunId``). ``verbose``: the ``ray.train`` logger's INFO
    records on the console too (they always go to the session's log files).
    A run already at ``run.storage_path/run.name`` is continued, extended, reported finished or refused as
    ``pipelines.resume`` says; ``restart`` moves it aside first. ``fail_at_epoch``: fault drills (``parse_drills``)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines import resume, tracking
    from pipelines.ray_runtime import init_ray

    cfg = resolve_paths(cfg)
    ensure_prepared(cfg)
    manifest = check_dataset(cfg, verify=verify)
    run_dir = storage.display(cfg.run.storage_path, cfg.run.name)
    _check_storage(cfg.run.storage_path)
    if restart and (moved := resume.move_aside(run_dir)):
        print(f"[{cfg.run.name}] --restart: the previous run moved to {moved}", flush=True)
    before = resume.inspect(cfg, run_dir)
    if before.finished:
        print(f"[{cfg.run.name}] already finished (epoch {before.epoch + 1} of {cfg.train.epochs}), nothing to "
              f"train; its checkpoint: {before.checkpoint} (--restart trains it again)", flush=True)
        return TrainResult(before.metrics, before.checkpoint, None, run_dir)
    if "train.epochs" in before.changed:
        old_epochs, _ = before.changed["train.epochs"]
        print(f"[{cfg.run.name}] extending the run from {old_epochs} to {cfg.train.epochs} epochs: the lr schedule is "
              f"rebuilt for {cfg.train.epochs} epochs and continues after epoch {before.epoch + 1}", flush=True)
    init_ray(address, log_level="INFO" if verbose else "WARNING")
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = sys.stderr.isatty()
    data_ctx.print_on_execution_start = False  # an execution plan per dataset per epoch drowns the progress lines
    use_gpu = _use_gpu(cfg.scaling.use_gpu)
    fs, run_path = storage.resolve(cfg.run.storage_path)
    fs.create_dir(storage.join(run_path, cfg.run.name), recursive=True)
    run_id, resumed = tracking.start_run(cfg.run.mlflow_uri, cfg.run.experiment, cfg.run.name, run_dir,
                                         cfg.resolved(), tags={"dynloss.command": " ".join(sys.argv), **(tags or {})},
                                         reopen=before.checkpoint is not None)  # a run with no checkpoint starts over
    if resumed and before.metrics:  # a driver killed between Ray Train's registration and EpochMetrics' log
        tracking.RunLogger(cfg.run.mlflow_uri, run_id).metrics_if_missing(before.metrics, step=before.epoch)
    print(f"[{cfg.run.name}] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {cfg.run.mlflow_uri}; "
          f"{cfg.scaling.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}; checkpoints in {run_dir}", flush=True)
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    try:  # from here on, every way out ends the MLflow run: FINISHED, FAILED, or KILLED (Ctrl-C)
        result = TorchTrainer(
            train_loop,
            train_loop_config={"config": cfg.resolved(), "mlflow_uri": cfg.run.mlflow_uri, "run_id": run_id,
                               "run_dir": run_dir, "fail_at_epoch": fail_at_epoch, "verbose": verbose},
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path,
                                 callbacks=[tracking.EpochMetrics(cfg.run.mlflow_uri, run_id), *callbacks],
                                 failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                                 logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "WARNING")),
            datasets=build_datasets(cfg, manifest),
            dataset_config=_exact_split_config(cfg.data.shuffle == "none"),
        ).fit()
    except BaseException as e:
        tracking.finish_run(cfg.run.mlflow_uri, run_id, None,
                            status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    metrics = dict(result.metrics or {})
    with (result.checkpoint.as_directory() if result.checkpoint is not None else nullcontext(None)) as d:
        tracking.finish_run(cfg.run.mlflow_uri, run_id, d, summary={k: metrics[k] for k in ("eval/top1", "epoch")
                                                                     if k in metrics})
    print(f"[{cfg.run.name}] done: {final_line(metrics)}; checkpoint {checkpoint}", flush=True)
    return TrainResult(metrics, checkpoint, run_id, run_dir)


# ------------------------------------------------------------------------------------------ per worker
def parse_drills(spec: str | int | None) -> dict[int, str]:
    """``"1:kill,2"`` -> {1: "kill", 2: "raise"}; a ValueError names what is wrong."""
    drills: dict[int, str] = {}
    for part in str(spec).split(",") if spec not in (None, "") else []:
        epoch, _, kind = part.strip().partition(":")
        kind = kind or "raise"
        if not epoch.isdigit() or kind not in DRILLS:
            raise ValueError(f"{FAIL_ENV}={spec!r}: each drill is EPOCH or EPOCH:{'|'.join(DRILLS)} "
                             f"(e.g. 1:kill,2), got {part!r}")
        drills[int(epoch)] = kind
    return drills


def _maybe_fail(loop_config: dict, epoch: int) -> None:
    """Fault drills, each once per run (a marker file in the run directory): ``raise`` makes every worker raise at
    the start of the epoch; ``kill`` arms a timer that SIGKILLs the last worker's process a moment into it."""
    import signal
    import threading

    from dynloss import distributed

    kind = parse_drills(loop_config.get("fail_at_epoch")).get(epoch)
    if kind is None:
        return
    marker = os.path.join(loop_config["run_dir"], f".injected_{'failure' if kind == 'raise' else 'kill'}_epoch{epoch}")
    fired = os.path.exists(marker)
    distributed.barrier()  # every worker looks before one writes the marker: all act, or none
    if fired:
        return
    victim = distributed.world_size() - 1 if kind == "kill" else 0
    if distributed.rank() == victim:
        open(marker, "w").close()
    if kind == "raise":
        raise RuntimeError(f"{FAIL_ENV}={epoch}: injected failure at the start of epoch {epoch}")
    if distributed.rank() == victim:
        threading.Timer(KILL_AFTER_S, os.kill, (os.getpid(), signal.SIGKILL)).start()


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function: build (or resume), then per epoch train, evaluate, checkpoint, report."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint

    from dynloss.epoch import flip_notice
    from pipelines.ray_runtime import quiet_train_worker_logs
    from pipelines.resume import CHECKPOINT_PREFIX
    from pipelines.tracking import RunLogger
    from pipelines.train_worker import Worker

    cfg = Config.model_validate(loop_config["config"])
    if not loop_config.get("verbose"):
        quiet_train_worker_logs()
    if cfg.scaling.torch_threads:  # Ray starts every worker at OMP_NUM_THREADS = floor(its CPUs)
        torch.set_num_threads(cfg.scaling.torch_threads)
    ctx = ray.train.get_context()
    rank, epochs = ctx.get_world_rank(), cfg.train.epochs
    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint is not None else nullcontext(None)) as d:
        worker = Worker(cfg, rank, ctx.get_world_size(), ray.train.torch.get_device(), d)
    logger = RunLogger(loop_config["mlflow_uri"], loop_config["run_id"]) if rank == 0 and loop_config.get("run_id") \
        else None
    if rank == 0 and worker.start_epoch:
        _say(f"[{cfg.run.name}] resumed after epoch {worker.start_epoch - 1}")
    times = []
    for epoch in range(worker.start_epoch, epochs):
        _maybe_fail(loop_config, epoch)
        t0 = time.perf_counter()
        metrics = worker.train_epoch(epoch)
        notice = flip_notice(worker.c, worker.state, metrics)
        if notice and rank == 0:
            _say(f"[{cfg.run.name}] {notice}")
        last = epoch == epochs - 1
        warning = None
        if (epoch + 1) % cfg.train.eval_every == 0 or last:
            evaluated, warning = worker.evaluate(epoch)
            metrics.update(evaluated)
        report = worker.label_report(epoch) if last else None
        times.append(time.perf_counter() - t0)
        metrics.update({"time/epoch_s": times[-1], "epoch": epoch})
        with tempfile.TemporaryDirectory() as d:
            worker.save(d, epoch, metrics, report)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:04d}")
        if rank == 0:
            left = sum(times) / len(times) * (epochs - epoch - 1)
            _say(f"[{cfg.run.name}] epoch {epoch + 1}/{epochs}  {final_line(metrics)}  "
                 f"{metrics['time/images_per_s']:.0f} img/s  {times[-1]:.1f} s  ~{left:.0f} s left")
            if warning:
                _say(f"[{cfg.run.name}] {warning}")
            if logger is not None:  # the epoch's metrics: tracking.EpochMetrics, once Ray Train registers it
                plots = worker.plot_inputs()
                if plots is not None and ("eval/top1" in metrics or last):
                    logger.plots(*plots, epoch=epoch)
        if epoch == worker.start_epoch:  # imports done, components built: see pipelines.gc_tuning
            gc_tuning.settle()


def _say(line: str) -> None:
    # the real stdout: Ray Train V2's patched print would show every line twice (log record + tee)
    print(line, file=sys.__stdout__, flush=True)


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynloss train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (pipelines/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable): --set optim.lr=0.05")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: run.mlflow_uri, sqlite:///mlflow.db)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local `ray start`, or embedded)")
    p.add_argument("--restart", action="store_true",
                   help="start run.name afresh: its previous checkpoints are moved to NAME.restarted-STAMP (not deleted)")
    p.add_argument("--verify", action="store_true",
                   help="check every shard's sha256 against the manifest before training (sizes are always checked)")
    p.add_argument("--verbose", action="store_true",
                   help="the ray.train logger's INFO records on the console too")
    p.add_argument("--compare", nargs="+", metavar="LOSS",
                   help="train the config once per loss (run.name gets the loss appended) and print the final "
                        "clean-test metrics side by side: --compare ce dynamic")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.set) + ([f"run.mlflow_uri={args.mlflow_uri}"] if args.mlflow_uri else [])
    fail_at = os.environ.get(FAIL_ENV)
    try:
        parse_drills(fail_at)
    except ValueError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, overrides)
        # every variant is validated before anything starts
        configs = {loss: load_config(args.config, overrides + [f"loss.name={loss}", f"run.name={cfg.run.name}-{loss}"])
                   for loss in args.compare} if args.compare else {cfg.loss.name: cfg}
    except ConfigError as e:
        print(f"train: invalid config {e}", file=sys.stderr)
        return 2
    import ray

    from pipelines.ray_runtime import shutdown_ray

    owns_ray = not ray.is_initialized()
    results, seconds = {}, {}
    try:
        for loss, c in configs.items():
            t0 = time.perf_counter()
            results[loss] = run(c, address=args.address, fail_at_epoch=fail_at,
                                verbose=args.verbose, restart=args.restart, verify=args.verify)
            seconds[loss] = time.perf_counter() - t0
    except ConfigError as e:  # found once the dataset is prepared (loss parameters, splits)
        print(f"train: invalid config {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Ray's TrainingFailedError carries the worker traceback
        print(f"train: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if owns_ray:
            shutdown_ray()
    if args.compare:
        print(f"\nclean-test results ({args.config}, MLflow: {cfg.run.mlflow_uri})")
        print(compare_table({k: r.metrics for k, r in results.items()}, seconds), flush=True)
    return 0 if all(r.checkpoint for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
