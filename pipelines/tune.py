"""Ray Tune sweeps of the training pipeline: each trial is a ``dynloss train`` run, an MLflow child of the sweep's run.

    dynloss tune --config pipelines/configs/fashion_mnist_lt.yaml --space tune_spaces/metadata_size.yaml
    dynloss tune --config pipelines/configs/digits.yaml --space tune_spaces/baselines.yaml --set train.epochs=4
    dynloss tune --config pipelines/configs/fashion_mnist_lt.yaml --space meta_optim --searcher optuna --samples 16
    dynloss tune --config pipelines/configs/fashion_mnist_lt.yaml --space tune_spaces/metadata_size.yaml --resume
    ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m pipelines.tune --config CFG.yaml --space tune_spaces/metadata_size.yaml --mlflow-uri http://MLFLOW:5000

What it does (DESIGN.md section 5, "Tune"):
  1. validates the base config and the space (tune_spaces: every key and value a trial can get goes through the
     ``--set`` mechanism and the config schema; all errors at once, exit 2, before Ray starts);
  2. starts or connects to Ray (pipelines.ray_runtime, token auth on) and opens the sweep's MLflow run (reopened
     by ``--resume``);
  3. runs ``tune.Tuner`` over ``trial``, a function trainable that calls ``pipelines.train.run`` (the very code
     of ``dynloss train``: Ray Data, a ``TorchTrainer``, checkpoints, the same MLflow logging) with Ray Tune's
     ``TuneReportCallback`` and the tags that nest its MLflow run under the sweep's; ASHA stops weak trials
     early on the clean evaluation metric (grace period and reduction factor from the space); the searcher is
     Ray Tune's random/grid generator or Optuna's TPE; trials run concurrently as the cluster's GPUs allow
     (one trial per ``scaling.num_workers`` GPUs; on CPUs, per ``num_workers * cpus_per_worker + data.decode_cpus``;
     ``TrialSlots`` holds that count also for the trials ``--resume`` starts again);
  4. at the end the sweep's run gets ``sweep_summary.csv`` / ``.md`` (each trial's sampled values, final top-1,
     few-shot accuracy, trust separation, epochs, time), ``sweep_top1.png`` (the metric against each swept
     value) and ``best_config.yaml`` (the best trial's resolved config, which ``dynloss train --config``
     accepts unchanged); the summary is printed, the files are also written to the sweep's directory.
Trial runs stopped by ASHA end KILLED in MLflow with the tag ``dynloss.early_stopped``; errored trials FAILED.

Where things go: the sweep's directory is ``run.storage_path/<sweep name>`` (default name: ``<run.name>-<space>``):
Ray Tune's experiment state, ``train/<sweep name>-<trial id>/`` (each trial's Train run: checkpoints, MLflow marker) and the
summary files. ``--resume`` (``Tuner.restore``) continues an interrupted sweep there: finished trials are kept,
errored and unfinished ones run again from their last checkpoint, in the same MLflow runs.
Exit status: 0 every trial ended, 1 some trial errored (``--resume`` retries it), 2 invalid config/space.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from dynloss.config import ConfigError, load_config, resolve_paths, validate
from dynloss.data import storage
from pipelines.train import FAIL_ENV
from tune_spaces import Space, SpaceError, case_label, describe, load_space, override, trial_overrides

TRIAL_CPUS = 0.05  # the trial process only waits on its TorchTrainer (Tune refuses a trial with no resources)
SUMMARY_COLUMNS = (("eval/top1", "top-1"), ("eval/few_shot", "few-shot"), ("meta/trust_gap", "trust gap"),
                   ("epochs", "epochs"), ("time_s", "time (s)"))


@dataclass(frozen=True)
class Sweep:
    """What every trial needs: the validated base config (absolute paths), the space, the MLflow parent."""
    base: dict
    source: str                 # the config file (messages)
    space: Space
    name: str
    storage_path: str           # the base config's run.storage_path (absolute or URI)
    parent_run_id: str
    fail_at_epoch: str | None = None  # the fault drills of pipelines.train (DYNLOSS_FAIL_AT_EPOCH), per trial
    verbose: bool = False             # Ray Train's INFO logs on the console (dynloss train --verbose)

    @property
    def path(self) -> str:
        return storage.display(self.storage_path, self.name)

    @property
    def train_storage(self) -> str:
        return storage.join(self.path, "train")

    def trial_config(self, params: dict, case: dict | None, trial_id: str):
        overrides = trial_overrides(self.space, params, case)
        overrides += [f"run.name={self.name}-{trial_id}", f"run.storage_path={self.train_storage}"]
        return validate(copy.deepcopy(self.base), self.source, overrides)


# ------------------------------------------------------------------------------------------------ trial
class TrialSlots:
    """At most ``n`` trials train at once: Tune's ``max_concurrent_trials`` limits only the trials its searcher
    suggests, not the errored and unfinished ones ``Tuner.restore`` starts again all together; on a small CPU
    machine those would each hold their Train workers' CPUs while every one's Ray Data waits for a free CPU,
    forever. A holder proves it is alive through a lease actor it owns (an idle actor answers at once, and
    dies with its owner): the slot of a trial stopped by ASHA is taken back."""

    def __init__(self, n: int):
        self.n, self.holders = n, {}

    async def acquire(self, trial_id: str, holder) -> None:
        import asyncio

        import ray

        while True:
            for tid, lease in list(self.holders.items()):
                try:
                    await asyncio.wait_for(lease.__ray_ready__.remote(), timeout=60)
                except ray.exceptions.RayActorError:
                    self.holders.pop(tid, None)  # its trial is gone: the slot is free again
                except asyncio.TimeoutError:
                    pass  # a busy node: keep the slot
            if len(self.holders) < self.n or trial_id in self.holders:
                self.holders[trial_id] = holder
                return
            await asyncio.sleep(2)

    def release(self, trial_id: str) -> None:
        self.holders.pop(trial_id, None)


class _Lease:
    """An idle actor whose only job is to be alive as long as the trial that made it."""


def _slots_name(sweep: Sweep) -> str:
    return f"dynloss-trial-slots-{sweep.name}"


def trial(config: dict, sweep: Sweep) -> None:
    """The function trainable: one ``dynloss train`` run with this trial's values, reported to Tune."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines import train

    trial_id = tune.get_context().get_trial_id()
    slots = ray.get_actor(_slots_name(sweep))
    lease = ray.remote(num_cpus=0)(_Lease).remote()  # owned by this trial's actor: dies with it
    ray.get(slots.acquire.remote(trial_id, lease))
    params, case = dict(config.get("params") or {}), config.get("case")
    cfg = sweep.trial_config(params, case, trial_id)
    sampled = {**params, **({"case": case_label(case)} if case else {})}
    tags = {"mlflow.parentRunId": sweep.parent_run_id, "dynloss.sweep": sweep.name, "dynloss.trial_id": trial_id,
            "dynloss.sampled": json.dumps(sampled)[:5000]}
    try:
        train.run(cfg, fail_at_epoch=sweep.fail_at_epoch, callbacks=[TuneReportCallback()], tags=tags,
                  verbose=sweep.verbose)
    finally:
        slots.release.remote(trial_id)
        ray.kill(lease)


# ------------------------------------------------------------------------------------------- the sweep
def param_space(space: Space) -> dict:
    from ray import tune

    def domain(d):
        if d.kind == "grid":
            return tune.grid_search(list(d.values))
        if d.kind == "choice":
            return tune.choice(list(d.values))
        if d.kind == "randint":
            return tune.randint(int(d.values[0]), int(d.values[1]) + 1)  # Tune's upper end is exclusive
        return getattr(tune, d.kind)(*d.values)

    out: dict = {"params": {k: domain(d) for k, d in space.params.items()}}
    if space.cases:
        out["case"] = tune.grid_search(space.cases)
    return out


def max_concurrent(cfg, resources: dict) -> int:
    """Trials at once: one per ``num_workers`` GPUs on a GPU cluster; on CPUs, per the CPUs a trial takes."""
    gpus = resources.get("GPU", 0)
    if cfg.scaling.use_gpu is not False and gpus >= 1:
        return max(1, int(gpus // cfg.scaling.num_workers))
    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.decode_cpus + TRIAL_CPUS
    return max(1, int(resources.get("CPU", 1) // per_trial))


def _tune_config(space: Space, samples: int, concurrent: int, epochs: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # max_t one past the last epoch: a trial that reaches the end finishes by itself (ASHA stopping it at max_t
    # would kill its Ray Train run while it shuts down, leaving its resources to Ray's cleaner)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1, **space.asha) if space.asha else None
    search_alg = None
    if space.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    return tune.TuneConfig(metric=space.metric, mode="max", scheduler=scheduler, search_alg=search_alg,
                           num_samples=samples, max_concurrent_trials=concurrent,
                           trial_dirname_creator=lambda t: f"trial_{t.trial_id}")


def run_sweep(sweep: Sweep, samples: int, concurrent: int, epochs: int, resume: bool):
    """Tuner.fit (or Tuner.restore(...).fit) of ``trial``; returns the ResultGrid."""
    import ray
    from ray import tune

    # owned by this driver and referenced until the sweep ends: gone with it, made anew by --resume
    slots = ray.remote(num_cpus=0)(TrialSlots).options(name=_slots_name(sweep)).remote(concurrent)
    ray.get(slots.__ray_ready__.remote())
    trainable = tune.with_resources(tune.with_parameters(trial, sweep=sweep), {"CPU": TRIAL_CPUS})
    if resume:
        tuner = tune.Tuner.restore(sweep.path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(sweep.space),
                           tune_config=_tune_config(sweep.space, samples, concurrent, epochs),
                           run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage_path, verbose=1))
    try:
        return tuner.fit()
    finally:
        ray.kill(slots)


# ------------------------------------------------------------------------------------------- summary
def summarize(results, space: Space, epochs: int) -> list[dict]:
    """One row per trial: id, status, sampled values, final metrics (the trial's last report)."""
    rows = []
    for r in results:
        m, cfg = dict(r.metrics or {}), r.config or {}
        row = {"trial": m.get("trial_id") or os.path.basename(str(r.path)).removeprefix("trial_")}
        row.update({k: (cfg.get("params") or {}).get(k) for k in space.params})
        if space.cases:
            row["case"] = case_label(cfg.get("case") or {})
        done = int(m.get("epoch", -1)) + 1
        row["status"] = "error" if r.error is not None else ("early-stopped" if done < epochs else "done")
        row["epochs"] = done
        for key in dict.fromkeys(("eval/top1", "eval/few_shot", space.metric)):
            row[key] = m.get(key, float("nan"))
        trust = (m.get("meta/trust_clean"), m.get("meta/trust_noisy"))
        row["meta/trust_gap"] = trust[0] - trust[1] if None not in trust else float("nan")
        row["time_s"] = m.get("time_total_s", float("nan"))
        rows.append(row)
    rows.sort(key=lambda r: -r[space.metric] if not math.isnan(r[space.metric]) else math.inf)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else (f"{v:.4g}" if abs(v) < 10 else f"{v:.0f}")
    return "-" if v is None else str(v)


def tables(rows: list[dict], space: Space) -> tuple[str, str]:
    """(CSV, Markdown) of the summary rows."""
    columns = dict(SUMMARY_COLUMNS)
    columns.setdefault(space.metric, space.metric)
    keys = ["trial", *space.swept(), "status", *columns]
    heads = ["trial", *space.swept(), "status", *columns.values()]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(heads)
    writer.writerows([[r.get(k) for k in keys] for r in rows])
    md = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    md += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def close_trial_runs(uri: str, parent_run_id: str, status: dict[str, str]) -> None:
    """End the trials' MLflow runs as Tune saw the trials (``status``: trial id -> a summary row's status).

    A trial ASHA stopped ends KILLED with the tag ``dynloss.early_stopped``, whether its run was left RUNNING (the
    trial's actor went before ``dynloss train`` could close it) or FAILED (Tune's stop reached ``fit`` as an error
    first; which comes first varies between machines). An errored trial's run still RUNNING ends FAILED.
    """
    from pipelines import tracking

    for run in tracking.child_runs(uri, parent_run_id):
        tid, state = run.data.tags.get("dynloss.trial_id"), run.info.status
        if status.get(tid) == "early-stopped" and state in ("RUNNING", "FAILED"):
            tracking.finish_run(uri, run.info.run_id, None, status="KILLED", tags={"dynloss.early_stopped": "true"})
        elif status.get(tid) == "error" and state == "RUNNING":
            tracking.finish_run(uri, run.info.run_id, None, status="FAILED")


def finish(sweep: Sweep, results, epochs: int, uri: str) -> tuple[list[dict], str | None]:
    """Close the trials' MLflow runs, write and log the summary, plot and best config; (rows, best config path)."""
    import yaml

    from pipelines import tracking

    space = sweep.space
    rows = summarize(results, space, epochs)
    close_trial_runs(uri, sweep.parent_run_id, {r["trial"]: r["status"] for r in rows})
    csv_text, md_text = tables(rows, space)
    best = next((r for r in rows if not math.isnan(r[space.metric])), None)
    fs, path = storage.resolve(sweep.path)
    files = {"sweep_summary.csv": csv_text.encode(), "sweep_summary.md": md_text.encode()}
    best_path = None
    if best is not None:
        result = next(r for r in results if (r.metrics or {}).get("trial_id") == best["trial"])
        cfg = sweep.trial_config(dict(result.config.get("params") or {}), result.config.get("case"), best["trial"])
        cfg.run.name = f"{sweep.name}-best"
        cfg.run.storage_path = sweep.storage_path
        head = (f"# Best trial {best['trial']} of sweep {sweep.name} ({space.path}, {space.metric} "
                f"{best[space.metric]:.4f}); train it with\n"
                f"#   dynloss train --config best_config.yaml\n")
        files["best_config.yaml"] = (head + yaml.safe_dump(cfg.resolved(), sort_keys=False)).encode()
        best_path = storage.display(sweep.path, "best_config.yaml")
    for name, data in files.items():
        storage.write_atomic(fs, storage.join(path, name), data)
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        fig = tracking.sweep_plot(rows, space.swept(), "eval/top1")
        fig.savefig(os.path.join(d, "sweep_top1.png"), dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        tracking.RunLogger(uri, sweep.parent_run_id).artifact(d)
    any_error = any(r["status"] == "error" for r in rows)
    tracking.finish_run(uri, sweep.parent_run_id, None, status="FAILED" if any_error else "FINISHED",
                        summary={f"best.{space.metric}": best[space.metric]} if best else None,
                        tags={"best.trial": best["trial"]} if best else None)
    return rows, best_path


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynloss tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="base experiment YAML (pipelines/configs/*.yaml)")
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/NAME.yaml, or a bundled NAME)")
    p.add_argument("--samples", type=int, help="draws per grid point (random) / trials (optuna); default: the space's")
    p.add_argument("--searcher", choices=("random", "optuna"), help="override the space's searcher")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key for every trial (as in dynloss train)")
    p.add_argument("--name", help="sweep name (default: <run.name>-<space name>); its directory is "
                                  "run.storage_path/NAME")
    p.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue the interrupted sweep at PATH (default: this sweep's directory)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: from the cluster's GPUs/CPUs)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: run.mlflow_uri)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local `ray start`, or embedded)")
    p.add_argument("--verbose", action="store_true", help="Ray Train's INFO logs of every trial on the console")
    return p


def _load(args) -> tuple:
    overrides = list(args.set) + ([f"run.mlflow_uri={args.mlflow_uri}"] if args.mlflow_uri else [])
    space = load_space(args.space, args.config, overrides, searcher=args.searcher)
    if args.samples is not None and args.samples < 1:
        raise SpaceError([f"--samples: must be >= 1, got {args.samples}"], space.path)
    # the sweep's base: the config, --set, then the space's fixed keys (what every trial shares)
    fixed = [override(k, v) for k, v in space.fixed.items()]
    return resolve_paths(load_config(args.config, [*overrides, *fixed])), space


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, space = _load(args)
    except (ConfigError, SpaceError) as e:
        print(f"tune: invalid {'space' if isinstance(e, SpaceError) else 'config'} {e}", file=sys.stderr)
        return 2
    storage_path, name = cfg.run.storage_path, args.name or f"{cfg.run.name}-{space.name}"
    if args.resume:  # an explicit sweep directory: STORAGE/NAME
        storage_path, name = os.path.split(args.resume.rstrip("/"))
    sweep_dir = storage.display(storage_path, name)
    import ray
    from ray import tune

    from pipelines import tracking
    from pipelines.ray_runtime import init_ray, shutdown_ray

    exists = tune.Tuner.can_restore(sweep_dir)
    if args.resume is not None and not exists:
        print(f"tune: nothing to resume at {sweep_dir} (no Ray Tune experiment there)", file=sys.stderr)
        return 2
    if args.resume is None and exists:
        print(f"tune: a sweep already exists at {sweep_dir}: add --resume to continue it, or --name NEW for a new "
              "sweep", file=sys.stderr)
        return 2
    owns_ray, parent, uri = not ray.is_initialized(), None, cfg.run.mlflow_uri
    try:
        init_ray(args.address, log_level="INFO" if args.verbose else "WARNING")
        fs, path = storage.resolve(sweep_dir)
        fs.create_dir(path, recursive=True)
        params = {"sweep": {"config": args.config, "set": args.set, "space": space.path, "searcher": space.searcher,
                            "metric": space.metric, "asha": space.asha, "swept": describe(space)},
                  **cfg.resolved()}
        parent, reopened = tracking.start_run(uri, cfg.run.experiment, name, sweep_dir, params,
                                              tags={"dynloss.kind": "sweep", "dynloss.command": " ".join(sys.argv)})
        fail_at = os.environ.get(FAIL_ENV)
        sweep = Sweep(cfg.resolved(), args.config, space, name, storage_path, parent,
                      fail_at, args.verbose)
        concurrent = args.max_concurrent or max_concurrent(cfg, ray.cluster_resources())
        samples = args.samples or space.samples
        print(f"[{name}] sweep of {space.path} over {args.config} ({'resumed' if reopened else 'new'} MLflow run "
              f"{parent} at {uri}); {samples} sample(s), up to {concurrent} trial(s) at once; in {sweep_dir}\n"
              f"{describe(space)}", flush=True)
        t0 = time.perf_counter()
        results = run_sweep(sweep, samples, concurrent, cfg.train.epochs, resume=args.resume is not None)
        rows, best = finish(sweep, results, cfg.train.epochs, uri)
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - the sweep's MLflow run must not stay RUNNING
        interrupted = isinstance(e, KeyboardInterrupt)
        if parent is not None:
            tracking.finish_run(uri, parent, None, status="KILLED" if interrupted else "FAILED")
        print("tune: interrupted; continue with the same command and --resume" if interrupted
              else f"tune: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 130 if interrupted else 1
    finally:
        if owns_ray:
            shutdown_ray()
    print(f"\n[{name}] {len(rows)} trial(s), {time.perf_counter() - t0:.0f} s; MLflow run {parent} at {uri}")
    print(tables(rows, space)[1])
    if best:
        print(f"best config: {best}  (dynloss train --config {best})")
    errors = [r["trial"] for r in rows if r["status"] == "error"]
    if errors:
        print(f"tune: {len(errors)} trial(s) errored ({', '.join(errors)}); rerun with --resume to retry them",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
