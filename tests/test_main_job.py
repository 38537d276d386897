"""The README's main command, shortened: set-up + CE, logit-adjusted CE and Dynamic Loss on Fashion-MNIST-LT.

Runs exactly `bash cluster/local/dev.sh run` with overrides that keep it to one epoch each and out of the
working tree, then checks the printed table and the three MLflow runs in a real SQLite store.
"""
import os
import re
import subprocess
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_main_command_prints_the_three_losses_side_by_side(tmp_path):
    if not os.path.isdir(FMNIST):
        pytest.skip(f"{FMNIST} missing: install the Debian package dataset-fashion-mnist")
    readme = (ROOT / "README.md").read_text()
    assert "bash cluster/local/dev.sh run" in readme
    db = tmp_path / "mlflow.db"
    # one epoch each; no warm-up, so the Dynamic Loss's one epoch is a meta epoch (ranking pass, meta steps), and
    # no flip check (it decides on the classifier after warm-up: config refuses it without one)
    cmd = ["bash", "cluster/local/dev.sh", "run",
           "--set", "train.epochs=1", "--set", "dynamic.warmup_epochs=0", "--set", "dynamic.flip_check=null",
           "--set", f"data.path={tmp_path / 'fmnist'}", "--set", f"run.storage_path={tmp_path / 'runs'}",
           "--mlflow-uri", f"sqlite:///{db}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # not Ray Train's placement-group cleaner saying "State API may be temporarily unavailable" every few seconds
    # (pipelines.ray_runtime starts the runtime with the State API it needs)
    assert "Failed to query Ray Train Controller" not in proc.stdout + proc.stderr
    # nor Ray Train's line per report, nor Ray Data's per-dataset lines (--verbose brings them back)
    for internal in ("Reporting training result", "TrainingReport(", "execution finished in", "Progress bars disabled",
                     "exclude_resources"):
        assert internal not in proc.stdout + proc.stderr, internal
    table = proc.stdout[proc.stdout.index("clean-test results"):]
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ce|logit_adjusted|dynamic)\s+([0-9.]+)", table,
                                                                re.M)}
    assert set(rows) == {"ce", "logit_adjusted", "dynamic"}, table
    assert all(0.1 < v <= 1.0 for v in rows.values()), rows  # better than chance after one epoch

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert {f"fmnist-lt-dynamic-{n}" for n in rows} <= set(runs["tags.mlflow.runName"]), runs
    for name, top1 in rows.items():
        run = runs[runs["tags.mlflow.runName"] == f"fmnist-lt-dynamic-{name}"].iloc[0]
        assert run["metrics.eval/top1"] == pytest.approx(top1, abs=1e-4)
