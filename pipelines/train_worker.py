"""What one Ray Train worker builds and supplies; ``pipelines.train.train_loop`` strings it together.

The epoch itself is ``dynloss.epoch`` (ranking pass, rank table, meta set, meta steps, fine-tune, evaluation,
trust), the same function the Ray-free runner ``dynloss.local`` calls; the components come from
``dynloss.builder.build_components``. This module only supplies data and keeps checkpoints:

* ``RayData`` is the epoch's ``EpochData``: the ranking pass and evaluation give each worker its part of the
  train / eval split (every row exactly once over the workers) and ``dynloss.epoch`` all-gathers them, so
  **every worker computes the same rank table and meta set**. A pass whose worker part, decoded, fits
  ``data.cache_mb`` (``in_worker_passes``; digits, (Fashion-)MNIST, CIFAR) is no Ray Dataset at all: the worker
  reads the split from the shards, keeps every ``world``-th row in id order and decodes it once (a streaming
  dataset costs a split-coordinator actor and a first execution, seconds per run, whatever its size); a larger
  one streams this worker's streaming-split part. Either way the decoded batches are kept after the first pass
  when they fit (``dynloss.data.cache``): later epochs neither read nor decode them again;
* the meta set is left out of the epoch's training stream **on the worker side** (``dynloss.epoch.leave_out``,
  a per-batch id filter: the Ray Dataset handed to the trainer cannot change per epoch, and a ~1% filter
  costs nothing);
* meta and fine-tune rows are read straight from the shards by id (row groups outside them are skipped) and
  decoded with the preset's views; which rows form each batch is decided in ``dynloss.epoch``;
* with ``data.decode_on: device`` the training stream arrives encoded and the worker decodes it, and the meta
  batches, on its device (``pipelines.data.iter_train_batches``; nvJPEG for JPEGs on a GPU).
Mixed precision (bfloat16 autocast) and channels_last apply on CUDA only.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dynloss.builder import Components, build_components, build_preset
from dynloss.checkpoint import load_rng, load_state, restore, save_rng, save_state
from dynloss.config import Config
from dynloss.data import read_manifest, read_split, storage
from dynloss.data.batches import SHARD_COLUMNS, iter_local_batches, read_rows, views_on_device
from dynloss.data.cache import PassCache
from dynloss.epoch import TrainState, evaluate, ranking_pass, run_epoch, trust, watch_collapse
from dynloss.schedules import fast_forward

LABEL_REPORT = "label_report.parquet"
PER_CLASS = "per_class.json"


#: data.shuffle: blocks - the training stream's local shuffle buffer, in batches (Ray Data's advice for block order)
BLOCKS_BUFFER_BATCHES = 8
PASS_SPLITS = ("rank", "eval")  # the un-augmented passes: the train split in the eval view, the eval split


def pass_split(cfg: Config, name: str) -> str:
    """The split a pass reads: the train split for ``rank``, ``data.eval_split`` for ``eval``."""
    return "train" if name == "rank" else cfg.data.eval_split


def in_worker_passes(cfg: Config, manifest: dict) -> set[str]:
    """The passes whose worker part, decoded (uint8 pixels + three int64 columns a row), fits ``data.cache_mb``
    together: read and decoded by each worker itself, kept after the first pass; the others stream through Ray
    Data (rank first: it runs every epoch of the Dynamic Loss). ``cache_mb: 0`` streams both."""
    preset = build_preset(cfg, manifest)[2]
    per_row = preset.view_bytes + 3 * 8
    budget, used, out = cfg.data.cache_mb * 2**20, 0, set()
    for name in PASS_SPLITS:
        rows = int(manifest["splits"][pass_split(cfg, name)]["rows"])
        need = -(-rows // cfg.scaling.num_workers) * per_row
        if used + need <= budget:
            used += need
            out.add(name)
    return out


def read_rows_by_id(root: str, split: str, ids: np.ndarray) -> pa.Table:
    """Shard rows whose id is in ``ids`` (row groups outside them are skipped), in id order."""
    entry = read_manifest(root)["splits"][split]
    fs, base = storage.resolve(root)
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    tables = []
    for shard in entry["shards"]:
        first = shard.get("first_id")
        sel = ids if first is None else ids[(ids >= first) & (ids < first + shard["rows"])]
        if sel.size:
            tables.append(pq.read_table(storage.join(base, shard["path"]), filesystem=fs,
                                        columns=list(SHARD_COLUMNS), filters=[("id", "in", sel.tolist())]))
    return pa.concat_tables(tables) if tables else read_split(root, split, columns=list(SHARD_COLUMNS)).slice(0, 0)


class RayData:
    """``dynloss.epoch.EpochData`` over this worker's Ray Data shards (``train``; ``rank`` and ``eval`` unless the
    worker reads them itself: ``in_worker``)."""

    def __init__(self, c: Components, world: int, rank: int, in_worker: set[str]):
        self.c, self.cfg = c, c.cfg
        self.local_batch = c.cfg.train.batch_size // world
        self.clean_meta = read_split(c.cfg.sampling.clean_meta, "train", columns=list(SHARD_COLUMNS)) \
            if c.cfg.sampling.clean_meta else None
        self.meta_rows: pa.Table | None = None
        self.cache = PassCache(c.cfg.data.cache_mb)  # the un-augmented passes, decoded once
        self.in_worker, self.world, self.rank = in_worker, world, rank
        # where the worker decodes what it decodes: the meta batches, and the training stream when it comes encoded
        self.decode_device = c.device if c.cfg.data.decode_on == "device" else torch.device("cpu")

    def _shard(self, name: str, batch_size: int, epoch: int, decode: dict | None = None, buffer: int | None = None):
        import ray.train

        from pipelines.data import iter_train_batches

        return iter_train_batches(ray.train.get_dataset_shard(name), batch_size=batch_size, device="cpu",
                                  epoch=epoch, seed=self.cfg.train.seed, decode=decode,
                                  local_shuffle_buffer_size=buffer)

    def train_batches(self, epoch: int) -> Iterator[dict]:
        from pipelines.data import augment_seed

        view = self.cfg.data.train_view
        decode = None
        if self.cfg.data.decode_on == "device":  # the dataset holds encoded rows (pipelines.train.build_datasets)
            decode = {"preset": self.c.preset, "train": True, "views": (view,), "device": self.decode_device,
                      "seed": augment_seed(self.cfg.train.seed, self.cfg.data.shuffle)}
        # shuffle "blocks" keeps a block's rows together: a buffer of a few batches mixes them anew each epoch
        buffer = BLOCKS_BUFFER_BATCHES * self.local_batch if self.cfg.data.shuffle == "blocks" else None
        for b in self._shard("train", self.local_batch, epoch, decode, buffer):
            yield {"id": b["id"], "x": b[view], "label": b["label"], "corrupt": b["corrupt"]}

    def _plain(self, name: str, epoch: int) -> Iterator[dict]:
        def decode() -> Iterator[dict]:
            if name in self.in_worker:  # every world-th row in id order: the workers' parts cover the split once
                split = pass_split(self.cfg, name)
                rows = read_rows(self.cfg.data.path, split)
                part = rows.take(pa.array(np.arange(self.rank, len(rows), self.world)))
                batches = iter_local_batches(self.cfg.data.path, split, self.c.preset, train=False, shuffle=False,
                                             batch_size=self.local_batch * 2, table=part)
            else:
                batches = self._shard(name, self.local_batch * 2, epoch)
            for b in batches:
                yield {"id": b["id"], "x": b["x"], "label": b["label"], "true_label": b["true_label"]}

        return self.cache.batches(name, decode)

    def rank_batches(self, epoch: int) -> Iterator[dict]:
        return self._plain("rank", epoch)

    def eval_batches(self, epoch: int) -> Iterator[dict]:
        return self._plain("eval", epoch)

    def set_meta(self, ids: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        parts = [self.clean_meta] if self.clean_meta is not None else []
        if len(ids):
            parts.append(read_rows_by_id(self.cfg.data.path, "train", ids))
        self.meta_rows = pa.concat_tables(parts)
        return {"label": self.meta_rows["label"].to_numpy(), "true_label": self.meta_rows["true_label"].to_numpy()}

    def meta_batch(self, index: np.ndarray, view: str, seed: int) -> dict:
        v = views_on_device(self.meta_rows.take(pa.array(index)), self.c.preset, True, self.decode_device, seed=seed,
                            views=(view,))
        return {"x": v[view], "label": v["label"]}


class Worker:
    """One worker's components, data and training state (see the module docstring)."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, checkpoint_dir: str | None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.manifest = read_manifest(cfg.data.path)
        self.c = build_components(cfg, self.manifest, device, world=world, rank=rank)
        self.state, self.start_epoch = TrainState(), 0
        if checkpoint_dir is not None:
            state = load_state(checkpoint_dir, map_location=device)
            # a run extended to more epochs (pipelines.resume) gets the schedule of its new length
            extended = state["config"]["train"]["epochs"] != cfg.train.epochs
            restore(state, model=self.c.model, optimizer=self.c.optimizer,
                    scheduler=None if extended else self.c.scheduler, dyn=self.c.dyn,
                    meta_optimizer=self.c.meta_optimizer, criterion=self.c.criterion, ema=self.c.ema)
            if extended:
                fast_forward(self.c.scheduler, state["iteration"])
            self.start_epoch = state["epoch"] + 1
            self.state.iteration, self.state.rank_table = state["iteration"], state["rank_table"]
            extra = state.get("extra") or {}
            self.state.best_top1 = float(extra.get("best_top1", float("nan")))
            self.state.flipped = extra.get("flipped")  # the flip check's decision, not made again
            load_rng(checkpoint_dir, rank)
        import ray.train.torch

        self.c.model = ray.train.torch.prepare_model(self.c.model)  # DDP (gloo on CPU, NCCL on GPU) when world > 1
        self.data = RayData(self.c, world, rank, in_worker_passes(cfg, self.manifest))
        self.per_class: np.ndarray | None = None  # last evaluation's per-class accuracy

    @property
    def counts(self) -> list[int]:
        return self.c.counts

    def train_epoch(self, epoch: int) -> dict[str, float]:
        return run_epoch(self.c, self.data, self.state, epoch)

    def evaluate(self, epoch: int) -> tuple[dict[str, float], str | None]:
        """Eval metrics and, after warm-up, a warning line when top-1 fell far below the run's best."""
        metrics, self.per_class = evaluate(self.c, self.data, self.state, epoch)
        return metrics, watch_collapse(self.c, self.state, metrics, epoch)

    def trust(self) -> np.ndarray | None:
        return trust(self.c, self.state)

    def label_report(self, epoch: int) -> pa.Table:
        """id, given label, predicted label, trust w, true label, loss, rank: from a final ranking pass."""
        c = ranking_pass(self.c, self.data, self.state, epoch)
        w = self.trust()
        return pa.table({"id": c["id"], "label": c["label"], "pred": c["pred"],
                         "trust": w if w is not None else np.full(len(c["id"]), np.nan, np.float32),
                         "true_label": c["true_label"], "loss": c["loss"].astype(np.float32), "rank": c["rank"]})

    # ------------------------------------------------------------------------------------- checkpoint
    def save(self, directory: str, epoch: int, metrics: dict, report: pa.Table | None) -> None:
        """Rank 0 writes the state; every rank its RNG file (Ray Train merges the workers' directories)."""
        if self.rank == 0:
            c = self.c
            save_state(directory, model=c.model, optimizer=c.optimizer, scheduler=c.scheduler, epoch=epoch,
                       iteration=self.state.iteration, config=self.cfg.resolved(), dyn=c.dyn,
                       meta_optimizer=c.meta_optimizer, rank_table=self.state.rank_table, criterion=c.criterion,
                       ema=c.ema, metrics=metrics,
                       extra={"train_counts": c.counts, "num_classes": c.num_classes,
                              "classes": list(self.manifest.get("classes") or []),
                              "preset": c.preset_name, "mode": c.mode,
                              "image_size": (self.manifest.get("image") or {}).get("size"),
                              "best_top1": self.state.best_top1, "flipped": self.state.flipped})
            if report is not None:
                pq.write_table(report, os.path.join(directory, LABEL_REPORT))
            if self.per_class is not None:
                names = list(self.manifest.get("classes") or range(self.c.num_classes))
                with open(os.path.join(directory, PER_CLASS), "w") as f:
                    json.dump({"classes": [str(n) for n in names], "train_counts": self.counts,
                               "accuracy": [None if np.isnan(a) else float(a) for a in self.per_class]}, f)
        save_rng(directory, self.rank)

    def plot_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        dyn = self.c.dyn
        if dyn is None:
            return None
        with torch.no_grad():
            margins = dyn.margins().float().cpu().numpy()
        counts = np.maximum(np.asarray(self.counts, float), 1.0)
        return margins, np.log(counts / counts.sum()), dyn.corrector.curves().float().cpu().numpy()
