"""The driver of `dynloss train` killed outright (SIGKILL to its whole process group: the driver and the embedded
Ray runtime it started, as a closed terminal or an OOM kill of the job would), then the same command run again:
it continues after the last checkpoint in the same MLflow run, and every epoch is logged once.

A real `python -m pipelines.train` subprocess on a real local Ray runtime and a real SQLite MLflow store.
(The worker-side faults, a worker SIGKILLed mid-epoch and one raising, are drilled in tests/test_train.py.)

    .venv/bin/python -m pytest tests/test_faults.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.ray
FIRST_CHECKPOINT_TIMEOUT_S = 600


def _job(digits: str, tmp_path) -> dict:
    return {
        "name": "killed-driver",
        "data": {"path": digits, "preset": "digits"},
        "model": {"name": "small_cnn"},
        "loss": {"name": "ce"},
        "optim": {"lr": 0.05, "schedule": "cosine", "warmup_epochs": 1},
        "train": {"epochs": 3, "batch_size": 64, "seed": 0},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(tmp_path / "runs"), "max_failures": 0,
                "mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }


@pytest.mark.timeout(1800)
def test_a_killed_driver_rerun_resumes_in_the_same_mlflow_run(digits, tmp_path):
    from mlflow.tracking import MlflowClient

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(digits, tmp_path)))
    run_dir = tmp_path / "runs" / "killed-driver"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def epoch0_logged() -> bool:  # rank 0 logs an epoch after Ray Train has committed its checkpoint
        if not (run_dir / "mlflow_run.json").exists():
            return False
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        return bool(client.get_metric_history(run_id, "train/loss"))

    command = [sys.executable, "-m", "pipelines.train", "--config", str(path), "--address", "local"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + FIRST_CHECKPOINT_TIMEOUT_S
        while not epoch0_logged():
            assert first.poll() is None, f"the first run ended (exit {first.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no first checkpoint in time"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the runtime it started, mid-epoch-1
        first.wait()
    marker = json.loads((run_dir / "mlflow_run.json").read_text())
    assert client.get_run(marker["run_id"]).info.status == "RUNNING"  # nobody was left to end it

    again = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=FIRST_CHECKPOINT_TIMEOUT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed after epoch" in again.stdout + again.stderr
    for internal in ("TrainingReport(", "execution finished in", "Progress bars disabled",  # quiet unless --verbose
                     "exclude_resources"):
        assert internal not in again.stdout + again.stderr, internal
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == marker["run_id"]
    run = client.get_run(marker["run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(marker["run_id"], "train/loss")) == [0, 1, 2]
    assert (run_dir / "checkpoint_epoch0002").is_dir()
