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

    def first_checkpoint_committed() -> bool:
        # Rank 0 logs an epoch to MLflow once its `ray.train.report` returns, which is before the Train controller
        # has registered that checkpoint (its snapshot file): a kill in between leaves nothing to resume from, and
        # the rerun starts over (seen once in CI). Both, then: the epoch logged and its checkpoint registered.
        try:
            registered = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
            run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
            return False
        return bool(registered) and bool(client.get_metric_history(run_id, "train/loss"))

    command = [sys.executable, "-m", "pipelines.train", "--config", str(path), "--address", "local"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + FIRST_CHECKPOINT_TIMEOUT_S
        while not first_checkpoint_committed():
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
    # were registered between the check and the kill (digits' epochs take ~0.3 s here); never the last.
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
    # The dead run logged the epochs before the checkpoint's (and that one unless the kill came between Ray Train's
    # registration and rank 0's log: a gap the product leaves, see docs/reliability.md). An epoch logged but not yet
    # registered is trained and logged again: a second point at that step. The rerun: exactly the epochs after.
    assert set(range(resume_after)) <= {m.step for m in history if m.timestamp < rerun_ms}
    assert sorted(m.step for m in history if m.timestamp >= rerun_ms) == list(range(resume_after + 1, EPOCHS))
    assert (run_dir / f"checkpoint_epoch{EPOCHS - 1:04d}").is_dir()

