"""The Ray Train pipeline end to end on a real local Ray runtime (2 CPUs, gloo) and a real SQLite MLflow store.

Three fits share one runtime and one prepared dataset (scikit-learn digits made long-tailed with 30% noise):
  * 2 workers, Dynamic Loss, 3 epochs (CE warm-up, then meta-learning), one corrupt training image, two fault
    drills (max_failures=2): one worker's process SIGKILLed a second into epoch 1, then every worker raising at
    the start of epoch 2; it finishes, resumed from the last checkpoint each time (no epoch lost or repeated in
    MLflow), counts the corrupt image, logs params, metrics, plots, the label report and the checkpoint;
    `dynloss evaluate` on that checkpoint reproduces eval/top1;
  * the same job submitted twice through the CLI: the first attempt dies at epoch 1 (max_failures=0), the
    resubmission continues from epoch 1 in the same MLflow run.
  * one engine, two drivers: the same config through Ray Train and through the Ray-free runner ``dynloss.local``
    gives the same metrics epoch by epoch.
Plus fast checks of the checkpoint format, the lr schedules, the shot thresholds and the console script.

    .venv/bin/python -m pytest tests/test_train.py -q
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dynloss.checkpoint import eval_weights, load_rng, load_state, restore, save_rng, save_state
from dynloss.config import validate
from dynloss.schedules import build_scheduler
from pipelines.evaluate import shot_thresholds

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------ fast, no Ray
def test_checkpoint_round_trip_is_weights_only_and_complete(tmp_path):
    from dynloss.dynamic import DynamicLoss
    from dynloss.meta import build_meta_optimizer
    from dynloss.models import build_model

    def parts():
        torch.manual_seed(0)
        model = build_model("small_cnn", 3, in_chans=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = build_scheduler(opt, "onecycle", steps_per_epoch=4, epochs=2)
        dyn = DynamicLoss(3, class_counts=[5, 3, 2], margin_prior="log_prior")
        return model, opt, sched, dyn, build_meta_optimizer(dyn)

    model, opt, sched, dyn, mopt = parts()
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step(), sched.step()
    dyn.margins().sum().backward()
    mopt.step()
    save_state(str(tmp_path), model=model, optimizer=opt, scheduler=sched, epoch=3, iteration=17,
               config={"name": "x"}, dyn=dyn, meta_optimizer=mopt, rank_table=torch.arange(5),
               extra={"train_counts": [5, 3, 2]})
    save_rng(str(tmp_path), 1)
    expected = torch.rand(3)

    state = load_state(str(tmp_path))  # torch.load(weights_only=True) inside
    fresh = parts()
    restore(state, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2], dyn=fresh[3], meta_optimizer=fresh[4])
    for a, b in zip(model.state_dict().values(), fresh[0].state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(dyn.state_dict().values(), fresh[3].state_dict().values()))
    assert fresh[2].get_last_lr() == sched.get_last_lr() and fresh[1].state_dict()["state"].keys()
    assert (state["epoch"], state["iteration"], state["rank_table"].tolist()) == (3, 17, [0, 1, 2, 3, 4])
    assert state["extra"]["train_counts"] == [5, 3, 2]
    assert json.loads((tmp_path / "config.json").read_text()) == {"name": "x"}
    assert load_rng(str(tmp_path), 1) and torch.equal(torch.rand(3), expected)  # RNG back where it was saved
    assert not load_rng(str(tmp_path), 5)
    with pytest.raises(ValueError, match="not a dynloss checkpoint"):
        load_state(str(tmp_path / "nope"))


def test_schedules_warm_up_decay_and_hold_past_the_end():
    def lrs(schedule, **kw):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        s = build_scheduler(opt, schedule, steps_per_epoch=10, epochs=10, **kw)
        out = []
        for _ in range(110):
            out.append(opt.param_groups[0]["lr"])
            opt.step(), s.step()
        return out

    cos = lrs("cosine", warmup_epochs=2)
    assert cos[0] == pytest.approx(0.05) and cos[19] == pytest.approx(1.0) and cos[20] == pytest.approx(1.0)
    assert cos[60] == pytest.approx(0.5) and cos[99] < 1e-3 and cos[105] == pytest.approx(0.0, abs=1e-9)
    step = lrs("step", milestones=[3, 6], gamma=0.1)
    assert step[29] == 1.0 and step[30] == pytest.approx(0.1) and step[60] == pytest.approx(0.01)
    one = lrs("onecycle")
    assert one[0] == pytest.approx(0.04) and max(one) == pytest.approx(1.0) and one[105] == one[99] < 1e-4


def test_shot_thresholds_scale_to_the_dataset():
    fmnist_lt = [6000, 3583, 2140, 1278, 763, 455, 272, 162, 97, 60]
    many, few = shot_thresholds(fmnist_lt)
    assert [c for c in fmnist_lt if c < few] == [162, 97, 60]
    assert [c for c in fmnist_lt if c > many] == [6000, 3583, 2140]
    assert shot_thresholds([1280, 400, 60, 15, 5]) == (100, 20)  # ImageNet-LT's own cut-offs when they fit
    many, few = shot_thresholds([50] * 10)
    assert not any(c > many or c < few for c in [50] * 10)  # balanced: every class is medium-shot


def test_console_script_dispatches_and_lists_commands(capsys):
    from pipelines.cli import main

    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian' (did you mean 'train'?)" in err and all(c in err for c in ("prepare", "evaluate"))
    assert main(["evaluate", "--checkpoint", "/nonexistent", "--data", "/nonexistent"]) == 2


# --------------------------------------------------------------------------------------- on Ray
ray = pytest.importorskip("ray")
CORRUPT_ID = 5



@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from pipelines import prepare

    out = str(tmp_path_factory.mktemp("data") / "digits_lt")
    assert prepare.main(["digits", "--out", out, "--imbalance", "0.1", "--noise", "sym:0.3", "--workers", "1",
                         "--no-progress"]) == 0
    # one training image truncated inside an intact shard (a source image damaged before `prepare --verify none`
    # kept it); the manifest records the shard as it now is, so only the decoder meets the damage
    shard = os.path.join(out, "train", "part-00000.parquet")
    table = pq.read_table(shard)
    images = table["image"].to_pylist()
    images[CORRUPT_ID] = images[CORRUPT_ID][:20]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, shard, row_group_size=1000)
    manifest = json.loads(Path(out, "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    entry["bytes"], entry["sha256"] = os.path.getsize(shard), hashlib.sha256(Path(shard).read_bytes()).hexdigest()
    Path(out, "manifest.json").write_text(json.dumps(manifest))
    return out


def base_config(data: str, tmp, name: str) -> dict:
    return {
        "name": name,
        "data": {"path": data, "preset": "digits"},
        "model": {"name": "small_cnn"},
        "loss": {"name": "dynamic"},
        "dynamic": {"warmup_epochs": 1, "margin_prior": "log_prior", "meta_batch_size": 32},
        "optim": {"lr": 0.05, "schedule": "cosine", "warmup_epochs": 1},
        "train": {"epochs": 2, "batch_size": 64, "seed": 0},
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(tmp / "runs"), "max_failures": 1, "mlflow_uri": f"sqlite:///{tmp}/mlflow.db"},
    }


def mlflow_client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def steps_of(client, run_id, key) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def dynamic_run(ray_local, digits, tmp_path_factory):
    from pipelines.train import run

    tmp = tmp_path_factory.mktemp("dynamic")
    raw = base_config(digits, tmp, "dyn2")
    raw["train"]["epochs"], raw["run"]["max_failures"] = 3, 2
    raw["train"]["ema_decay"] = 0.9  # the weight average through DDP, a resume and `dynloss evaluate`
    raw["dynamic"]["flip_check"] = 0.125  # decided once at epoch 1, kept through the restart at epoch 2
    cfg = validate(raw)
    started = time.perf_counter()
    result = run(cfg, fail_at_epoch="1:kill,2")
    seconds = time.perf_counter() - started
    print(f"\n2-worker dynamic run: {seconds:.1f} s, final {result.metrics.get('time/images_per_s', 0):.0f} img/s")
    return result, cfg, tmp


def test_a_truncated_shard_or_an_unwritable_storage_path_fails_before_training(digits, tmp_path, capsys, monkeypatch):
    import shutil

    import ray

    from pipelines import train
    from pipelines.train import main

    data = tmp_path / "data"
    shutil.copytree(digits, data)
    raw = base_config(str(data), tmp_path, "checks")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    shard = data / "test" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:1000])  # a partial copy
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{shard} is 1000 bytes, the manifest says" in err and "rerun `python -m pipelines.prepare digits" in err
    shutil.rmtree(data)
    shutil.copytree(digits, data)
    (tmp_path / "a_file").write_text("")
    assert main(["--config", str(path), "--set", f"run.storage_path={tmp_path / 'a_file' / 'runs'}"]) == 2
    assert "run.storage_path: cannot write checkpoints to" in capsys.readouterr().err
    # a disk this full (the real free space, a threshold above it): refused before training, not at the checkpoint
    monkeypatch.setattr(train, "MIN_FREE_MB", shutil.disk_usage(tmp_path).free // (1 << 20) + (1 << 30))
    assert main(["--config", str(path)]) == 2
    assert "MB free, less than the" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.ray
def test_two_worker_dynamic_run_logs_to_mlflow(dynamic_run):
    result, cfg, _ = dynamic_run
    client = mlflow_client(cfg.run.mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "dyn2"
    p = run.data.params
    assert p["loss.name"] == "dynamic" and p["scaling.num_workers"] == "2" and p["optim.lr"] == "0.05"
    for key in ("train/loss", "train/acc", "eval/top1", "eval/top5", "eval/many_shot", "eval/few_shot",
                "eval/class/9", "data/corrupt", "time/epoch_s", "time/images_per_s"):
        assert steps_of(client, result.run_id, key) == [0, 1, 2], key
    for key in ("meta/loss", "meta/trust_clean", "meta/trust_noisy", "meta/auc"):  # after the 1 warm-up epoch
        assert steps_of(client, result.run_id, key) == [1, 2], key
    last = run.data.metrics
    assert 0 <= last["meta/trust_noisy"] <= 1 and 0 <= last["meta/auc"] <= 1
    # the truncated image is dropped and counted every epoch; the job goes on
    assert [m.value for m in client.get_metric_history(result.run_id, "data/corrupt")] == [1.0, 1.0, 1.0]
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"plots", "checkpoint", "label_report.parquet"} <= names
    assert {a.path for a in client.list_artifacts(result.run_id, "plots")} == {"plots/margins.png",
                                                                               "plots/trust_curves.png"}
    assert "checkpoint/state.pt" in {a.path for a in client.list_artifacts(result.run_id, "checkpoint")}


@pytest.mark.ray
def test_label_report_covers_every_training_sample(dynamic_run, digits):
    from dynloss.data import read_split

    result, _, _ = dynamic_run
    report = pq.read_table(os.path.join(result.checkpoint, "label_report.parquet")).to_pandas()
    shards = read_split(digits, "train", columns=["id", "label", "true_label"]).to_pandas()
    shards = shards[shards["id"] != CORRUPT_ID].reset_index(drop=True)  # never decoded, so never ranked
    assert report["id"].tolist() == shards["id"].tolist()
    assert (report["label"].values == shards["label"].values).all()
    assert (report["true_label"].values == shards["true_label"].values).all()
    assert report["trust"].between(0, 1).all() and report["pred"].between(0, 9).all()


@pytest.mark.ray
def test_a_killed_worker_and_a_raising_one_resume_from_the_last_checkpoint(dynamic_run):
    result, cfg, _ = dynamic_run
    for marker in (".injected_kill_epoch1", ".injected_failure_epoch2"):  # both faults did happen
        assert os.path.exists(os.path.join(result.run_dir, marker)), marker
    client = mlflow_client(cfg.run.mlflow_uri)
    assert steps_of(client, result.run_id, "train/loss") == [0, 1, 2]  # nothing lost, nothing run twice
    assert result.metrics["epoch"] == 2 and result.checkpoint.endswith("checkpoint_epoch0002")
    state = load_state(result.checkpoint)
    assert state["epoch"] == 2 and state["rank_table"].shape == (sum(state["extra"]["train_counts"]),)
    averaged = eval_weights(state)  # the weight average went through both restarts with the rest of the state
    assert averaged.keys() == state["model"].keys() and int(state["ema"]["n_averaged"]) >= state["iteration"]
    assert not all(torch.equal(averaged[k], state["model"][k]) for k in averaged)
    # the flip check decided in epoch 1 (after the kill at its start), and the run resumed for epoch 2 kept it
    assert steps_of(client, result.run_id, "rank/flipped_labels") == [1] and isinstance(state["extra"]["flipped"], list)
    assert {"config.json", "label_report.parquet", "meta.json", "per_class.json", "rng-rank0.pt", "rng-rank1.pt",
            "state.pt"} <= set(os.listdir(result.checkpoint))


@pytest.mark.ray
def test_evaluate_reproduces_the_final_top1(dynamic_run, digits, tmp_path):
    from pipelines.evaluate import main

    result, _, _ = dynamic_run
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", result.checkpoint, "--data", digits, "--json", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["eval/images"] == result.metrics["eval/images"] == 355
    assert evaluated["eval/top1"] == pytest.approx(result.metrics["eval/top1"], abs=1e-9)
    assert evaluated["eval/top5"] == pytest.approx(result.metrics["eval/top5"], abs=1e-9)
    saved = json.loads(Path(result.checkpoint, "per_class.json").read_text())
    assert [None if math.isnan(a) else a for a in evaluated["per_class"]] == saved["accuracy"]
    assert len(saved["classes"]) == 10


@pytest.mark.ray
def test_evaluate_refuses_what_is_not_its_checkpoint_or_its_dataset(dynamic_run, digits, tmp_path, capsys):
    import shutil

    from pipelines.evaluate import main

    result, _, _ = dynamic_run
    for change, expected in (({"classes": [f"c{i}" for i in range(10)]}, "class names differ (0: 'c0' vs '0'"),
                             ({"image": {"mode": "RGB", "size": [8, 8]}}, "images are RGB (3 channels)"),
                             ({"image": {"mode": "L", "size": [28, 28]}}, "images are 28x28, the checkpoint was "
                                                                          "trained on 8x8")):
        other = tmp_path / f"other{len(os.listdir(tmp_path))}"
        shutil.copytree(digits, other)
        manifest = json.loads((other / "manifest.json").read_text())
        (other / "manifest.json").write_text(json.dumps({**manifest, **change}))
        assert main(["--checkpoint", result.checkpoint, "--data", str(other)]) == 2
        err = capsys.readouterr().err
        assert f"{other} does not match the checkpoint" in err and expected in err, err
    truncated = tmp_path / "truncated"
    shutil.copytree(result.checkpoint, truncated)
    state = (truncated / "state.pt").read_bytes()
    (truncated / "state.pt").write_bytes(state[: len(state) // 2])
    assert main(["--checkpoint", str(truncated), "--data", digits]) == 2
    assert "state.pt: unreadable" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--data", digits]) == 2
    assert "not a dynloss checkpoint (no state.pt)" in capsys.readouterr().err


def test_small_passes_are_read_by_the_workers_and_larger_ones_streamed(digits, tmp_path):
    """The rank and eval passes skip Ray Data when each worker's part, decoded, fits ``data.cache_mb`` (rank
    first); the Train runs of this module cover both ways (the resubmitted job streams, the others read)."""
    from dynloss.data import read_manifest
    from pipelines.train_worker import in_worker_passes

    manifest, raw = read_manifest(digits), base_config(digits, tmp_path, "passes")  # 2 workers, 8x8 grey, 591 + 355
    rank_part = 296 * (8 * 8 + 24)  # bytes: rows of one worker's half (rounded up), uint8 pixels + 3 int64
    for cache_mb, expected in ((1024, {"rank", "eval"}), (rank_part / 2**20, {"rank"}), (rank_part / 2**20 - 1e-6,
                                                                                         {"eval"}), (0, set())):
        raw["data"]["cache_mb"] = cache_mb
        assert in_worker_passes(validate(raw), manifest) == expected, cache_mb


@pytest.mark.ray
def test_resubmitting_the_same_job_resumes_it(ray_local, digits, tmp_path, monkeypatch):
    from pipelines.train import main

    raw = base_config(digits, tmp_path, "resubmit")
    raw["loss"] = {"name": "ce"}
    raw["train"]["epochs"] = 2
    raw["scaling"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5}
    raw["run"]["max_failures"] = 0
    raw["data"]["cache_mb"] = 0  # the rank and eval passes stream through Ray Data (elsewhere the worker reads them)
    raw["data"]["shuffle"] = "blocks"  # streamed in block order, mixed by the worker's local shuffle buffer
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DYNLOSS_FAIL_AT_EPOCH", "1")
    assert main(["--config", str(path)]) == 1  # dies at the start of epoch 1, after checkpointing epoch 0
    client = mlflow_client(raw["run"]["mlflow_uri"])
    marker = json.loads((tmp_path / "runs" / "resubmit" / "mlflow_run.json").read_text())
    assert client.get_run(marker["run_id"]).info.status == "FAILED"
    assert steps_of(client, marker["run_id"], "train/loss") == [0]

    monkeypatch.delenv("DYNLOSS_FAIL_AT_EPOCH")
    # the same job, submitted again; the rest of it decodes the training stream in the worker (data.decode_on)
    assert main(["--config", str(path), "--set", "train.eval_every=2", "--set", "data.decode_on=device"]) == 0
    run = client.get_run(marker["run_id"])
    assert run.info.status == "FINISHED"
    assert steps_of(client, marker["run_id"], "train/loss") == [0, 1]  # epoch 0 was not trained again
    assert run.data.tags.get("dynloss.changed_on_resume") == "data.decode_on,train.eval_every"
    corrupt = client.get_metric_history(marker["run_id"], "data/corrupt")
    assert [m.value for m in sorted(corrupt, key=lambda m: m.step)] == [1.0, 1.0]  # dropped by Ray Data, the worker
    assert run.data.metrics["train/images"] == 591 - 1
    assert math.isfinite(run.data.metrics["eval/top1"]) and run.data.metrics["eval/images"] == 355
    report = pq.read_table(tmp_path / "runs" / "resubmit" / "checkpoint_epoch0001" / "label_report.parquet")
    assert np.isnan(report.column("trust").to_numpy()).all()  # a baseline has no corrector
    assert report.num_rows == 591 - 1  # every training image but the corrupt one, streamed


@pytest.mark.ray
def test_a_rerun_is_finished_extended_refused_or_restarted(ray_local, digits, tmp_path, capsys):
    """Issue 9: rerunning a finished run says so at once; more epochs rebuild the schedule for the new length
    (the saved one-cycle schedule would run the new epochs at lr ~ 0); any other change is refused with the keys;
    --restart moves the old run aside and starts a new MLflow run."""
    from dynloss.checkpoint import load_state
    from pipelines.train import main

    raw = base_config(digits, tmp_path, "rerun")
    raw.update(loss={"name": "ce"}, optim={"lr": 0.05, "schedule": "onecycle"})
    raw["train"]["epochs"] = 1
    raw["scaling"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "rerun"
    assert main(["--config", str(path)]) == 0
    first = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    capsys.readouterr()

    started = time.perf_counter()
    assert main(["--config", str(path)]) == 0
    assert "already finished (epoch 1 of 1), nothing to train" in capsys.readouterr().out
    assert time.perf_counter() - started < 30  # no Ray Train run was started

    assert main(["--config", str(path), "--set", "train.epochs=2"]) == 0
    assert "extending the run from 1 to 2 epochs" in capsys.readouterr().out
    state = load_state(str(run_dir / "checkpoint_epoch0001"))
    steps = state["iteration"] // 2
    assert state["scheduler"]["total_steps"] == 2 * steps  # the schedule of the new length, not the saved one
    client = mlflow_client(raw["run"]["mlflow_uri"])
    assert steps_of(client, first, "train/loss") == [0, 1]  # the same MLflow run, each epoch once

    assert main(["--config", str(path), "--set", "train.epochs=2", "--set", "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.05 -> 0.1" in err and "--set run.name=NEW" in err and "--restart" in err

    assert main(["--config", str(path), "--set", "train.epochs=2", "--set", "optim.lr=0.1", "--restart"]) == 0
    out = capsys.readouterr().out
    assert "--restart: the previous run moved to" in out
    moved = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("rerun.restarted-")]
    assert len(moved) == 1 and (moved[0] / "checkpoint_epoch0001").is_dir()  # kept, not deleted
    second = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert second != first and client.get_run(second).info.status == "FINISHED"


DRIVER_KEYS = ("train/loss", "train/acc", "meta/loss", "finetune/loss", "eval/top1", "eval/few_shot", "data/corrupt",
               "meta/trust_clean", "meta/trust_noisy", "meta/set_size", "train/images", "meta/margin_slope")


@pytest.mark.ray
def test_ray_train_and_the_local_runner_give_the_same_metrics(ray_local, digits, tmp_path):
    """One engine, two drivers. The data order is made the same on both sides (``data.shuffle: none``: id order
    every epoch; the weak view without its random crop; meta and fine-tune batches on that weak view); the rest
    (rank table, meta set, meta-batch order, Gumbel pseudo-labels, fine-tune pass) runs as in production. What
    may differ is float arithmetic between two processes, hence a small tolerance."""
    from dynloss.local import train_local
    from pipelines.train import run

    raw = base_config(digits, tmp_path, "drivers")
    raw["data"].update({"preset_params": {"padding": 0}, "shuffle": "none"})
    raw["dynamic"].update({"meta_view": "weak", "finetune_view": "weak", "warmup_loss": "margins",
                           "pseudo_from": "adjusted"})
    raw["scaling"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1}
    raw["optim"] = {"lr": 0.02, "schedule": "onecycle"}
    cfg = validate(raw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray worker (1 CPU): the same float reduction order
    try:
        local = train_local(cfg, log=lambda line: None).history
    finally:
        torch.set_num_threads(threads)
    result = run(cfg)
    client = mlflow_client(cfg.run.mlflow_uri)
    compared = 0
    for key in DRIVER_KEYS:
        history = {m.step: m.value for m in client.get_metric_history(result.run_id, key)}
        for epoch, metrics in enumerate(local):
            assert (epoch in history) == (key in metrics), (key, epoch)
            if key in metrics:
                assert history[epoch] == pytest.approx(metrics[key], rel=1e-3, abs=1e-3), (key, epoch)
                compared += 1
    assert compared == 2 * 7 + 5  # 7 keys every epoch, 5 more in the meta epoch
    assert local[-1]["data/corrupt"] == 1 and local[-1]["eval/top1"] > 0.2  # not two chance-level models
