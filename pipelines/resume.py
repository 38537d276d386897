"""What rerunning a ``dynloss train`` command does with the run it finds (same ``run.name`` and ``run.storage_path``).

The last checkpoint's saved config is compared with the new one, key by key (``dynloss.config.flatten``):
  * nothing to train (the checkpoint is the last epoch): "already finished", nothing starts;
  * identical, or changed only in keys a resume can honour (``RESUMABLE``: more epochs, how often to evaluate,
    where to log, decode parallelism): the run continues from its checkpoint; a new ``train.epochs`` rebuilds the
    lr schedule for the new length (``pipelines.train_worker`` fast-forwards it to the iterations done) and is said;
  * any other change: refused (``ConfigError``, exit 2) with the changed keys and the two ways out: a new
    ``run.name``, or ``--restart``, which moves the old run aside (``NAME.restarted-YYYYmmdd-HHMMSS``, nothing is
    deleted) and starts the run afresh in a new MLflow run.

    dynloss train --config pipelines/configs/digits.yaml --set train.epochs=30     # extend a finished 20-epoch run
    dynloss train --config pipelines/configs/digits.yaml --restart                 # start it again
"""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field

from dynloss.config import Config, ConfigError, flatten
from dynloss.data import storage

RESUMABLE = ("train.epochs", "train.eval_every", "data.decode_cpus", "data.decode_concurrency", "data.decode_on",
             "data.cache_mb", "scaling.torch_threads", "run.")
CHECKPOINT_PREFIX = "checkpoint_epoch"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


@dataclass
class Resume:
    epoch: int | None = None               # the last checkpoint's epoch (None: a new run)
    checkpoint: str | None = None
    changed: dict[str, tuple] = field(default_factory=dict)  # key -> (saved, new), resumable keys only
    finished: bool = False                 # the checkpoint is the config's last epoch: nothing to train
    metrics: dict = field(default_factory=dict)  # what that checkpoint reported


def last_checkpoint(run_dir: str) -> str | None:
    """The checkpoint a rerun resumes from (local path or URI), or None: the latest one Ray Train registered (its
    ``SNAPSHOT``), which a kill can leave one behind the newest directory (written by the workers, then registered);
    the newest ``checkpoint_epochNNNN`` directory where there is no readable snapshot."""
    fs, path = storage.resolve(run_dir)
    if not storage.is_dir(fs, path):
        return None
    snapshot = storage.join(path, SNAPSHOT)
    if storage.is_file(fs, snapshot):
        try:
            latest = json.loads(storage.read_bytes(fs, snapshot))["latest_checkpoint_result"]
            return storage.join(run_dir, latest["checkpoint_dir_name"]) if latest else None
        except (ValueError, KeyError, TypeError):  # torn or foreign: Ray Train refuses it too, the directories say more
            pass
    names = sorted(i.base_name for i in storage.list_dir(fs, path)
                   if i.type == storage.pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))
    return storage.join(run_dir, names[-1]) if names else None


def _saved(checkpoint: str) -> dict:
    """A checkpoint's state (``dynloss.checkpoint.load_state``), its problems as a ConfigError naming the way out."""
    from dynloss.checkpoint import load_state

    try:
        return load_state(checkpoint)
    except ValueError as e:  # truncated or foreign file
        raise ConfigError([f"run.name: the last checkpoint of this run cannot be read ({e}); remove that directory "
                           "to resume from the one before, or --restart"]) from None


def inspect(cfg: Config, run_dir: str) -> Resume:
    """How this config relates to the run already at ``run_dir`` (ConfigError when it cannot continue it)."""
    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        return Resume()
    from dynloss.checkpoint import read_metrics

    state = _saved(checkpoint)
    epoch = int(state["epoch"])
    old, new = flatten(state["config"]), flatten(cfg.resolved())
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    refused = {k: v for k, v in diff.items() if not k.startswith(RESUMABLE)}
    if refused:
        lines = [f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in refused.items()]
        raise ConfigError([f"run.name: run {cfg.run.name!r} at {run_dir} (last checkpoint: epoch {epoch + 1}) was "
                           f"trained with another config ({len(refused)} key{'s' * (len(refused) > 1)} differ: "
                           f"{'; '.join(lines)}); give this config a new run.name (--set run.name=NEW), or start "
                           "that run afresh with --restart (its checkpoints are moved aside, not deleted)"])
    return Resume(epoch, checkpoint, diff, finished=epoch + 1 >= cfg.train.epochs, metrics=read_metrics(checkpoint))


def move_aside(run_dir: str) -> str | None:
    """``--restart``: rename the run's directory to ``NAME.restarted-STAMP``; returns the new location."""
    fs, path = storage.resolve(run_dir)
    if not storage.is_dir(fs, path):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = f"{path.rstrip('/')}.restarted-{stamp}"
    fs.move(path, target)
    return storage.display(posixpath.dirname(run_dir.rstrip("/")), posixpath.basename(target))
