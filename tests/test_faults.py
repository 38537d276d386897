"""The driver of `dynloss train` killed outright together with the embedded Ray runtime it started (SIGKILL to every
process of its session, as a machine or container going away would), then the same command run again: it continues
after the last checkpoint in the same MLflow run, and every epoch is logged once.

A real `python -m pipelines.train` subprocess on a real local Ray runtime and a real SQLite MLflow store.
(The worker-side faults, a worker SIGKILLed mid-epoch and one raising, are drilled in tests/test_train.py.)

    .venv/bin/python -m pytest tests/test_faults.py -q
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

FIRST_CHECKPOINT_TIMEOUT_S = 600
EPOCHS = 10  # ~0.3 s each on digits: enough that the kill comes well before the last one


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` until none is left. Not `os.killpg`: the raylet starts each Ray worker
    (the Train controller, the training worker, ...) in a process group of its own, and those outlive a killed group
    long enough to train on and register more checkpoints (CI once saw the dead run finish all its epochs)."""
    while True:
        members = []
        for entry in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{entry}/stat").read() if entry.isdigit() else ""
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
            if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry))
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _job(digits: str, tmp_path) -> dict:
    return {
        "name": "killed-driver",
        "data": {"path": digits, "preset": "digits"},
        "model": {"name": "small_cnn"},
        "loss": {"name": "ce"},
        "optim": {"lr": 0.05, "schedule": "cosine", "warmup_epochs": 1},
        "train": {"epochs": EPOCHS, "batch_size": 64, "seed": 0},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(tmp_path / "runs"), "max_failures": 0,
                "mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }


@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_a_killed_driver_rerun_resumes_in_the_same_mlflow_run(digits, tmp_path):
    from mlflow.tracking import MlflowClient

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(digits, tmp_path)))
    run_dir = tmp_path / "runs" / "killed-driver"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def first_epoch_logged() -> bool:
        # MLflow gets an epoch from the Train controller once it has registered that epoch's checkpoint
        try:
            run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
            return False
        return bool(client.get_metric_history(run_id, "train/loss"))

    command = [sys.executable, "-m", "pipelines.train", "--config", str(path), "--address", "local"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + FIRST_CHECKPOINT_TIMEOUT_S
        while not first_epoch_logged():
            assert first.poll() is None, f"the first run ended (exit {first.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no first checkpoint in time"
            time.sleep(0.1)
    finally:
        _kill_session(first.pid)  # the driver and the whole runtime it started (start_new_session: its own session)
        first.wait()
    marker = json.loads((run_dir / "mlflow_run.json").read_text())
    assert client.get_run(marker["run_id"]).info.status == "RUNNING"  # nobody was left to end it
    rerun_ms = time.time() * 1000  # MLflow timestamps: what the rerun logged comes after this

    again = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=FIRST_CHECKPOINT_TIMEOUT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # The epoch it resumes after is the last one the dead run's controller registered: 0, or a later one when more
    # were registered between the check and the kill (digits' epochs take ~0.3 s here); never the last. A newer
    # checkpoint directory the workers wrote but the controller had not registered yet is not resumed from.
    found = re.search(r"resumed after epoch (\d+)", again.stdout + again.stderr)
    assert found and int(found.group(1)) < EPOCHS - 1, again.stdout + again.stderr
    resume_after = int(found.group(1))
    for internal in ("TrainingReport(", "execution finished in", "Progress bars disabled",  # quiet unless --verbose
                     "exclude_resources"):
        assert internal not in again.stdout + again.stderr, internal
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == marker["run_id"]
    run = client.get_run(marker["run_id"])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(marker["run_id"], "train/loss")
    # Every epoch once: the dead run logged what its controller had registered (the epoch it registered last too,
    # unless the kill came between the registration and the log: then the rerun logs it from the checkpoint), the
    # rerun exactly the epochs after it. An epoch the dead run trained but never registered is in neither.
    assert sorted(m.step for m in history) == list(range(EPOCHS))
    assert sorted(m.step for m in history if m.timestamp >= rerun_ms) in (list(range(resume_after + 1, EPOCHS)),
                                                                         list(range(resume_after, EPOCHS)))
    assert (run_dir / f"checkpoint_epoch{EPOCHS - 1:04d}").is_dir()


def _checkpoint(directory, epoch: int, loss: float) -> None:
    import torch

    from dynloss.checkpoint import save_state

    model = torch.nn.Linear(2, 2)
    save_state(str(directory), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=epoch,
               iteration=epoch + 1, config={}, metrics={"epoch": epoch, "train/loss": loss})


def test_a_rerun_resumes_from_the_checkpoint_ray_train_registered(tmp_path):
    """The workers write an epoch's checkpoint directory before the Train controller registers it: a kill in between
    leaves a newer directory than the snapshot names. Ray Train resumes from the snapshot's; so does `resume`."""
    from pipelines.resume import SNAPSHOT, last_checkpoint

    run_dir = tmp_path / "run"
    for epoch in (0, 1):
        _checkpoint(run_dir / f"checkpoint_epoch{epoch:04d}", epoch, 2.0 - epoch)
    assert last_checkpoint(str(run_dir)).endswith("checkpoint_epoch0001")  # no snapshot: the newest directory
    snapshot = run_dir / SNAPSHOT
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_epoch0000"}}))
    assert last_checkpoint(str(run_dir)).endswith("checkpoint_epoch0000")
    snapshot.write_text(json.dumps({"latest_checkpoint_result": None}))  # none registered: Ray Train starts over
    assert last_checkpoint(str(run_dir)) is None
    snapshot.write_text('{"latest_checkpoint_res')  # torn: the directories
    assert last_checkpoint(str(run_dir)).endswith("checkpoint_epoch0001")
    assert last_checkpoint(str(tmp_path / "nothing")) is None


def test_a_resumed_run_logs_its_registered_epoch_once(tmp_path):
    """A driver killed between the controller's registration of an epoch and its MLflow log leaves the epoch
    checkpointed but unlogged: the rerun logs it from the checkpoint (`pipelines.train.run`), and only then."""
    from mlflow.tracking import MlflowClient

    from dynloss.checkpoint import read_metrics
    from pipelines.tracking import RunLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resume")).info.run_id
    logger = RunLogger(uri, run_id)
    logger.metrics({"epoch": 0, "train/loss": 2.0}, step=0)  # the dead run logged epoch 0; epoch 1 was not
    for epoch, loss in ((0, 2.0), (1, 1.5)):
        _checkpoint(tmp_path / f"ckpt{epoch}", epoch, loss)
    saved = {epoch: read_metrics(str(tmp_path / f"ckpt{epoch}")) for epoch in (0, 1)}
    assert not logger.metrics_if_missing(saved[0], step=0)  # logged: nothing again
    assert logger.metrics_if_missing(saved[1], step=1)
    assert not logger.metrics_if_missing(saved[1], step=1)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.5)]
    assert read_metrics(str(tmp_path / "missing")) == {}


def test_epoch_metrics_go_to_mlflow_once_per_report_and_a_failing_store_costs_a_warning(tmp_path, capsys):
    """`tracking.EpochMetrics`, the Train controller's callback, called as Ray Train calls it after registering a
    report: rank 0's metrics at step `epoch`; a store it cannot write to is named in a warning, training goes on."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import EpochMetrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("epochs")).info.run_id
    callback = EpochMetrics(uri, run_id)
    for epoch in (0, 1):
        callback.after_report(None, [{"epoch": epoch, "train/loss": 2.0 - epoch}, {"epoch": epoch, "train/loss": 9.0}],
                              checkpoint=None)
    callback.after_report(None, [{"note": 1.0}], checkpoint=None)  # not an epoch's report: nothing
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.0)]  # rank 0's values
    assert client.get_metric_history(run_id, "note") == []

    (tmp_path / "not-a-dir").write_text("")
    broken = EpochMetrics(f"sqlite:///{tmp_path}/not-a-dir/mlflow.db", run_id)
    broken.after_report(None, [{"epoch": 4, "train/loss": 0.5}], checkpoint=None)  # does not raise
    err = capsys.readouterr().err
    assert "epoch 4's metrics not logged" in err and "not-a-dir" in err and "meta.json" in err
