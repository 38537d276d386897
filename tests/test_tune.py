"""``dynloss tune``: search spaces validated before Ray starts, and real sweeps on a local Ray runtime + SQLite MLflow.

Fast (no Ray): the bundled spaces load against the bundled configs; baselines.yaml names every robust loss; a space
with an unknown key, a value the config schema rejects, a bad domain or Optuna with a grid fails with the file and
the key named, exit 2, Ray never started.
Ray (digits, CE/Dynamic, 1-3 epochs):
  * ASHA: a grid of a good and a useless learning rate, one trial at a time: the useless one is stopped after
    its first epoch, its MLflow run ends KILLED, tagged early-stopped, and its reserved CPUs are given back;
  * resume: both trials of a Dynamic-Loss sweep die at the start of epoch 1 (fault drill, max_failures 0); the same
    command with --resume finishes them from their epoch-0 checkpoints into the same MLflow runs (one parent, two
    children, every epoch logged once), writes the summary, the plot and a best config that ``dynloss train``
    accepts; a second --resume re-runs nothing;
  * Optuna (TPE) draws two different learning rates from a log-uniform range.

    .venv/bin/python -m pytest tests/test_tune.py -q
"""
from __future__ import annotations

import math
import os
import time

import pytest
import yaml

from dynloss.config import load_config
from dynloss.losses import LOSSES
from tune_spaces import SpaceError, load_space

DIGITS = "pipelines/configs/digits.yaml"
FMNIST = "pipelines/configs/fashion_mnist_lt.yaml"
BUNDLED = ("metadata_size", "sampling_hierarchy", "meta_optim", "baselines")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ------------------------------------------------------------------------------------ fast, no Ray
@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("config", [DIGITS, FMNIST])
def test_bundled_spaces_validate_against_the_bundled_configs(name, config):
    space = load_space(f"tune_spaces/{name}.yaml", config)
    assert space.params or space.cases
    assert os.path.samefile(load_space(name, config).path, space.path)  # a bundled space by name


def test_the_baselines_space_compares_every_robust_loss_with_the_dynamic_loss():
    space = load_space("tune_spaces/baselines.yaml", DIGITS)
    names = {c["loss.name"] for c in space.cases}
    assert names == set(LOSSES) | {"dynamic"}
    assert len(space.cases) > len(names)  # grids of parameters were expanded


@pytest.mark.parametrize("spec, expected", [
    ({"params": {"sampling.critrion": {"choice": ["easy"]}}}, ['params.sampling.critrion="easy"', "sampling.critrion",
                                                              "did you mean 'criterion'"]),
    ({"params": {"sampling.ratio1": {"uniform": [0.5, 1.5]}}}, ["params.sampling.ratio1=1.5", "must be <= 1"]),
    ({"params": {"sampling.criterion": {"grid": ["easy", "hardest"]}}}, ["sampling.criterion", "hardest"]),
    ({"params": {"optim.lr": {"normal": [0.1, 0.01]}}}, ["params.optim.lr: unknown domain 'normal'"]),
    ({"params": {"optim.lr": {"loguniform": [0.0, 0.1]}}}, ["loguniform needs low > 0"]),
    ({"params": {"optim.lr": {"choice": [0.1]}}, "searcher": "optuna", "cases": [{"loss.name": "ce"}]},
     ["searcher: optuna", "no grid axes or cases"]),
    ({"params": {"optim.lr": {"choice": [0.1]}}, "asha": {"grace": 2}}, ["asha: expected"]),
    ({"params": {"run.name": {"choice": ["x"]}}}, ["run.name: set by the sweep"]),
    ({"cases": [{"loss.name": "gce", "dynamic.meta_lr": {"grid": [0.01, -1]}}]},
     ["cases[1] (gce meta_lr=-1)", "dynamic.meta_lr: must be > 0"]),
    ({"params": {"optim.lr": {"choice": [0.1]}}, "sampels": 3}, ["sampels: unknown key (did you mean 'samples'?)"]),
])
def test_a_bad_space_names_the_file_and_the_key(tmp_path, spec, expected):
    path = write(tmp_path / "bad.yaml", spec)
    with pytest.raises(SpaceError) as e:
        load_space(path, DIGITS)
    text = str(e.value)
    assert text.startswith(path)
    for part in expected:
        assert part in text, text


def test_a_bad_space_exits_2_before_ray_starts(tmp_path, capsys):
    import ray

    from pipelines.tune import main

    path = write(tmp_path / "bad.yaml", {"params": {"dynamic.meta_lrr": {"choice": [0.001]}}})
    assert main(["--config", DIGITS, "--space", path]) == 2
    err = capsys.readouterr().err
    assert "dynamic.meta_lrr" in err and path in err
    assert not ray.is_initialized()


def test_eval_every_must_allow_early_stopping(tmp_path):
    path = write(tmp_path / "s.yaml", {"params": {"optim.lr": {"choice": [0.01]}}, "asha": {"grace_period": 1}})
    with pytest.raises(SpaceError, match="train.eval_every"):
        load_space(path, DIGITS, ["train.eval_every=2"])
    load_space(path, DIGITS, ["train.eval_every=1"])


def test_trial_runs_end_as_tune_saw_the_trials_whatever_state_the_trial_left(tmp_path):
    """A stopped trial's run may be left RUNNING or FAILED (its actor's stop races ``fit``): both end KILLED."""
    from mlflow.tracking import MlflowClient

    from pipelines.tune import close_trial_runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweeps")
    parent = client.create_run(exp).info.run_id
    left = {"a": "RUNNING", "b": "FAILED", "c": "RUNNING", "d": "FAILED", "e": "FINISHED"}
    ids = {}
    for tid, state in left.items():
        ids[tid] = client.create_run(exp, tags={"mlflow.parentRunId": parent, "dynloss.trial_id": tid}).info.run_id
        if state != "RUNNING":
            client.set_terminated(ids[tid], status=state)
    close_trial_runs(uri, parent, {"a": "early-stopped", "b": "early-stopped", "c": "error", "d": "error",
                                   "e": "done"})
    got = {tid: client.get_run(i) for tid, i in ids.items()}
    assert {tid: r.info.status for tid, r in got.items()} == {"a": "KILLED", "b": "KILLED", "c": "FAILED",
                                                               "d": "FAILED", "e": "FINISHED"}
    assert [tid for tid, r in got.items() if r.data.tags.get("dynloss.early_stopped") == "true"] == ["a", "b"]
    assert client.get_run(parent).info.status == "RUNNING"  # the sweep's own run is closed by finish, after this


# --------------------------------------------------------------------------------------- Ray sweeps
ray = pytest.importorskip("ray")




def config(tmp, data: str, **train) -> str:
    with open(DIGITS) as f:
        raw = yaml.safe_load(f)
    raw.pop("data")
    raw["data"] = {"path": data, "preset": "digits"}
    raw["dynamic"]["warmup_epochs"] = 1
    raw["train"].update({"epochs": 2, "batch_size": 64, **train})
    raw["scaling"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5}
    raw["run"] = {"storage_path": str(tmp / "runs"), "max_failures": 0, "mlflow_uri": f"sqlite:///{tmp}/mlflow.db",
                  "experiment": "sweeps"}
    return write(tmp / "base.yaml", raw)


def runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweeps")
    all_runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in all_runs if r.data.tags.get("dynloss.kind") == "sweep"]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.mark.ray
@pytest.mark.timeout(1800)  # two Train runs; minutes on a loaded 2-core machine
def test_asha_stops_a_useless_trial_early(ray_local, digits, tmp_path):
    from pipelines.tune import main

    base = config(tmp_path, digits, epochs=3)
    space = write(tmp_path / "lr.yaml", {"fixed": {"loss.name": "ce"}, "params": {"optim.lr": {"grid": [0.02, 1e-7]}},
                                         "asha": {"grace_period": 1, "reduction_factor": 2}})
    assert main(["--config", base, "--space", space, "--max-concurrent", "1"]) == 0
    client, parents, children = runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(parents) == 1 and len(children) == 2
    by_lr = {float(r.data.params["optim.lr"]): r for r in children}
    good, useless = by_lr[0.02], by_lr[1e-7]
    assert good.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(good.info.run_id, "eval/top1")) == [0, 1, 2]
    assert useless.info.status == "KILLED" and useless.data.tags.get("dynloss.early_stopped") == "true"
    assert len(client.get_metric_history(useless.info.run_id, "eval/top1")) < 3
    summary = (tmp_path / "runs" / "digits-dynamic-lr" / "sweep_summary.csv").read_text().splitlines()
    assert summary[0].startswith("trial,optim.lr,status,top-1")
    assert {line.split(",")[2] for line in summary[1:]} == {"done", "early-stopped"}
    # the stopped trial's Train run was killed, not shut down: Ray's cleaner must still give its CPUs back
    # (it needs the State API of this runtime: pipelines.ray_runtime), or the next trial would wait forever
    from ray.util import placement_group_table

    deadline = time.monotonic() + 120
    while any(p["state"] != "REMOVED" for p in placement_group_table().values()) and time.monotonic() < deadline:
        time.sleep(2)
    assert all(p["state"] == "REMOVED" for p in placement_group_table().values())


@pytest.mark.ray
@pytest.mark.timeout(1800)  # four Train runs (two fail, two resume)
def test_an_interrupted_sweep_resumes_into_the_same_mlflow_runs(ray_local, digits, tmp_path, monkeypatch, capsys):
    from pipelines.tune import main

    base = config(tmp_path, digits)
    space = write(tmp_path / "meta.yaml", {"fixed": {"loss.name": "dynamic"}, "asha": None,
                                           "params": {"dynamic.meta_lr": {"grid": [0.001, 0.01]}}})
    args = ["--config", base, "--space", space, "--max-concurrent", "1"]
    monkeypatch.setenv("DYNLOSS_FAIL_AT_EPOCH", "1")
    assert main(args) == 1  # both trials die at the start of epoch 1, after their epoch-0 checkpoint
    assert "rerun with --resume" in capsys.readouterr().err
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client, parents, children = runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert len(children) == 2 and all(r.info.status == "FAILED" for r in children)
    assert main(args) == 2  # the sweep exists: no silent second sweep into the same directory

    monkeypatch.delenv("DYNLOSS_FAIL_AT_EPOCH")
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    client, parents2, children2 = runs(uri)
    assert [p.info.run_id for p in parents2] == [parents[0].info.run_id]
    assert sorted(r.info.run_id for r in children2) == sorted(r.info.run_id for r in children)
    for r in children2:
        assert r.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "eval/top1")) == [0, 1]
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert math.isfinite(r.data.metrics["meta/trust_clean"])
    parent = client.get_run(parents[0].info.run_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "sweep_summary.md", "sweep_top1.png", "best_config.yaml"} <= artifacts
    sweep_dir = tmp_path / "runs" / "digits-dynamic-meta"
    best = load_config(sweep_dir / "best_config.yaml")  # what `dynloss train --config` reads
    assert best.run.name == "digits-dynamic-meta-best" and best.loss.name == "dynamic"
    assert best.dynamic.meta_lr in (0.001, 0.01)
    assert "| trial | dynamic.meta_lr | status |" in out and "best config:" in out

    mtime = os.path.getmtime(sweep_dir / "sweep_summary.csv")
    assert main([*args, "--resume"]) == 0  # nothing left to run: the finished trials are not trained again
    client, _, children3 = runs(uri)
    assert len(children3) == 2
    for r in children3:
        assert len(client.get_metric_history(r.info.run_id, "eval/top1")) == 2
    assert os.path.getmtime(sweep_dir / "sweep_summary.csv") >= mtime


@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_optuna_searches_a_continuous_range(ray_local, digits, tmp_path):
    pytest.importorskip("optuna")
    from pipelines.tune import main

    base = config(tmp_path, digits, epochs=1)
    space = write(tmp_path / "lr.yaml", {"fixed": {"loss.name": "ce"}, "searcher": "optuna", "samples": 2, "asha": None,
                                         "params": {"optim.lr": {"loguniform": [0.005, 0.05]}}})
    assert main(["--config", base, "--space", space, "--max-concurrent", "1"]) == 0
    _, parents, children = runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert parents[0].data.params["sweep.searcher"] == "optuna"
    lrs = sorted(float(r.data.params["optim.lr"]) for r in children)
    assert len(lrs) == 2 and lrs[0] != lrs[1] and all(0.005 <= v <= 0.05 for v in lrs)
    assert all(r.info.status == "FINISHED" for r in children)
