"""MLflow tracking of a training job: one run per job, params, per-epoch metrics, plots, label report, checkpoint.

Who logs what (DESIGN.md section 5; rank 0 only among the workers):
  driver (pipelines.train)  opens the run (or reopens it: a resubmitted job with the same run.name continues
                            the same MLflow run, its id kept in STORAGE/NAME/mlflow_run.json), logs the whole
                            resolved config flattened as params, and at the end the final checkpoint directory
                            (artifact ``checkpoint/``), ``label_report.parquet`` and the run status;
  Train controller          metrics every epoch under stable slash names (train/loss, meta/trust_clean,
                            eval/top1, data/corrupt, time/images_per_s, ...; step = epoch), rank 0's report, once
                            Ray Train has registered that epoch's checkpoint (``EpochMetrics``): an epoch whose
                            checkpoint was lost to a failure is trained again and logged once, by the run that
                            registers it;
  rank-0 worker             the plots ``plots/margins.png`` (learned margins against log prior: logit adjustment is the
                            line y = x) and ``plots/trust_curves.png`` (the corrector's rank-to-trust curves).
Default store: ``sqlite:///mlflow.db`` in the working directory (MLflow 3 refuses a plain file store by
default); ``--mlflow-uri http://HOST:5000`` for a tracking server, which workers on other nodes can reach.
New experiments on a SQLite store keep their artifacts next to the database (``mlartifacts/``).

    mlflow ui --backend-store-uri sqlite:///mlflow.db      # then open http://127.0.0.1:5000
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import numpy as np
from ray.train import UserCallback

from dynloss.config import flatten
from dynloss.data import storage
from pipelines.resume import CHECKPOINT_PREFIX

MARKER = "mlflow_run.json"
_PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
_PARAM_MAX_LEN = 6000


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]) or ".", "mlartifacts")
    return None


def experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except MlflowException:  # created meanwhile by a concurrent job
        return client.get_experiment_by_name(name).experiment_id


def _marker_path(run_dir: str) -> tuple:
    fs, path = storage.resolve(run_dir)
    return fs, storage.join(path, MARKER)


def _read_marker(run_dir: str) -> dict | None:
    fs, path = _marker_path(run_dir)
    if not storage.is_file(fs, path):
        return None
    try:
        return json.loads(storage.read_bytes(fs, path))
    except ValueError:
        return None


def start_run(uri: str, experiment: str, run_name: str, run_dir: str, params: Mapping,
              tags: Mapping[str, str] | None = None, reopen: bool = True) -> tuple[str, bool]:
    """(run id, resumed): reopen the job's MLflow run if ``run_dir`` names one in this store (and ``reopen``: the
    caller continues that run's checkpoint), else create it."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    marker = _read_marker(run_dir) if reopen else None
    if marker and marker.get("tracking_uri") == uri:
        try:
            run = client.get_run(marker["run_id"])
            client.update_run(run.info.run_id, status="RUNNING")
            _log_params(client, run.info.run_id, params, existing=run.data.params)
            return run.info.run_id, True
        except MlflowException as e:  # deleted from the store meanwhile
            print(f"MLflow run {marker['run_id']} of {run_dir} is gone ({e.error_code}); starting a new run",
                  file=sys.stderr)
    run = client.create_run(experiment_id(client, experiment, uri), run_name=run_name, tags=dict(tags or {}))
    _log_params(client, run.info.run_id, params, existing={})
    fs, path = _marker_path(run_dir)
    storage.write_atomic(fs, path, json.dumps({"tracking_uri": uri, "run_id": run.info.run_id}).encode())
    return run.info.run_id, False


def _log_params(client, run_id: str, params: Mapping, existing: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(params).items()}
    # MLflow params are immutable: a resumed job logs only the keys it did not log before
    new = [Param(k, v[:_PARAM_MAX_LEN]) for k, v in sorted(flat.items()) if k not in existing]
    changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v[:_PARAM_MAX_LEN])
    for i in range(0, len(new), _PARAM_BATCH):
        client.log_batch(run_id, params=new[i:i + _PARAM_BATCH])
    if changed:
        client.set_tag(run_id, "dynloss.changed_on_resume", ",".join(changed)[:5000])


class RunLogger:
    """What the rank-0 worker logs into an open run (metrics per epoch, plots)."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = _client(uri), run_id

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in sorted(values.items())
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def metrics_if_missing(self, values: Mapping[str, float], step: int) -> bool:
        """Log ``values`` at ``step`` unless the run has that step of its ``epoch`` metric already; True if logged."""
        if any(m.step == step for m in self.client.get_metric_history(self.run_id, "epoch")):
            return False
        self.metrics(values, step)
        return True

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        """A file, or every file of a directory."""
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def plots(self, margins: np.ndarray, log_prior: np.ndarray, curves: np.ndarray, epoch: int) -> None:
        """plots/margins.png and plots/trust_curves.png (overwritten each time: the latest epoch)."""
        with tempfile.TemporaryDirectory() as d:
            for name, fig in (("margins.png", margin_plot(margins, log_prior, epoch)),
                              ("trust_curves.png", trust_plot(curves, epoch))):
                path = os.path.join(d, name)
                fig.savefig(path, dpi=110, bbox_inches="tight")
                import matplotlib.pyplot as plt

                plt.close(fig)
                self.artifact(path, "plots")


class EpochMetrics(UserCallback):
    """Logs rank 0's report of each epoch at step ``epoch``, on the Train controller, right after Ray Train has
    registered that epoch's checkpoint (the controller's checkpoint manager handles a report before user callbacks).

    Logging from the worker instead, right after ``ray.train.report``, logs an epoch twice when a worker dies before
    the controller has collected every worker's report of it: the checkpoint is dropped, the epoch trained again.
    A tracking store that fails after MLflow's own retries costs a warning, not the run: the epoch's metrics are in
    its checkpoint's meta.json."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self._logger = uri, run_id, None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        values = metrics[0] if metrics else {}
        if "epoch" not in values:
            return
        epoch = int(values["epoch"])
        try:
            self._logger = self._logger or RunLogger(self.uri, self.run_id)
            self._logger.metrics(values, step=epoch)
        except Exception as e:  # noqa: BLE001 - any store failure: training goes on
            where = checkpoint.path if checkpoint is not None else f"{CHECKPOINT_PREFIX}{epoch:04d}"
            print(f"MLflow: epoch {epoch}'s metrics not logged to run {self.run_id} at {self.uri}: "
                  f"{type(e).__name__}: {e}; they are in {where}/meta.json", file=sys.stderr, flush=True)


def finish_run(uri: str, run_id: str, checkpoint_dir: str | None, status: str = "FINISHED",
               summary: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None) -> None:
    """Driver, after fit: the final checkpoint and label report as artifacts, tags, then the run status."""
    client = _client(uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    if checkpoint_dir:
        client.log_artifacts(run_id, checkpoint_dir, "checkpoint")
        report = os.path.join(checkpoint_dir, "label_report.parquet")
        if os.path.isfile(report):
            client.log_artifact(run_id, report)
    for k, v in (summary or {}).items():
        client.set_tag(run_id, f"final.{k}", str(v))
    client.set_terminated(run_id, status=status)


def child_runs(uri: str, parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id`` (a sweep's trials), any status."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10000)


# --------------------------------------------------------------------------------------------- plots
def _figure(width: float = 6.0, height: float = 4.0, panels: int = 0):
    """(figure, axes); ``panels`` > 0: a row of that many axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if panels:
        fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
        return fig, list(axes[0])
    return plt.subplots(figsize=(width, height))


def margin_plot(margins: Sequence[float], log_prior: Sequence[float], epoch: int):
    """Learned per-class margins against log prior; logit adjustment (tau = 1) is y = x + const."""
    margins, log_prior = np.asarray(margins, float), np.asarray(log_prior, float)
    fig, ax = _figure()
    ax.scatter(log_prior, margins, s=18)
    if len(margins) <= 30:
        for c, (x, y) in enumerate(zip(log_prior, margins)):
            ax.annotate(str(c), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    lo, hi = float(log_prior.min()), float(log_prior.max())
    shift = float(np.mean(margins - log_prior))  # softmax ignores a constant shift
    ax.plot([lo, hi], [lo + shift, hi + shift], "k--", lw=1, label="logit adjustment (y = log prior + c)")
    ax.set_xlabel("log prior (training class frequency)")
    ax.set_ylabel("learned margin")
    ax.set_title(f"margin generator, epoch {epoch}")
    ax.legend(fontsize=8)
    return fig


def trust_plot(curves: np.ndarray, epoch: int):
    """Trust w against loss-rank bucket, one line per class (mean and 10-90% band beyond 20 classes)."""
    curves = np.asarray(curves, float)
    fig, ax = _figure()
    r = np.arange(curves.shape[1])
    if curves.shape[0] <= 20:
        for c, row in enumerate(curves):
            ax.plot(r, row, lw=1, label=str(c))
        ax.legend(fontsize=6, ncol=2, title="class")
    else:
        ax.fill_between(r, np.quantile(curves, 0.1, 0), np.quantile(curves, 0.9, 0), alpha=0.3, label="10-90%")
        ax.plot(r, curves.mean(0), lw=1.5, label="mean over classes")
        ax.legend(fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("loss-rank bucket within the given class (0 = lowest loss)")
    ax.set_ylabel("trust w")
    ax.set_title(f"label corrector, epoch {epoch}")
    return fig


def sweep_plot(rows: Sequence[Mapping], swept: Sequence[str], metric: str):
    """``metric`` of every trial against each swept value, one panel per swept key (categories as ticks)."""
    fig, axes = _figure(width=4.0, height=3.6, panels=max(1, len(swept)))
    for ax, key in zip(axes, swept):
        xs, ys = [r.get(key) for r in rows], [r.get(metric, float("nan")) for r in rows]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.scatter(xs, ys, s=22)
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, s=22)
            ax.set_xticks(range(len(labels)), labels, rotation=60 if len(labels) > 4 else 0, ha="right", fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
