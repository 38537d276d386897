"""What one Ray Train worker builds and does in an epoch; ``pipelines.train.train_loop`` strings it together.

The math lives in dynloss (engine: train_one_epoch / finetune_on_meta / per_sample_losses / predict; sampling:
loss_ranks / hierarchical_sample; distributed: the DDP hooks). This module only moves data between them:

* ranking pass: the train split's un-augmented view, each worker its streaming-split part (every row exactly
  once), all-gathered; **every worker computes the same rank table and meta set** from the same gathered
  arrays (sorted by id) and the seed (train.seed, epoch), so no broadcast is needed;
* the meta set is left out of the epoch's training stream **on the worker side** (a per-batch id filter; the
  Ray Dataset handed to the trainer cannot change per epoch, and a ~1% filter costs nothing). A batch made
  only of meta rows is kept whole, so every worker still steps the same number of times;
* meta batches come from the meta rows read straight from the shards (an id filter that skips row groups),
  decoded with the preset's strong view; every worker takes an equal, disjoint slice of each global meta
  batch, so the averaged meta-gradient is that of one meta batch of ``dynamic.meta_batch_size``;
* evaluation: the eval split's eval view, each worker its part, gathered; metrics from pipelines.evaluate.
Mixed precision (bfloat16 autocast) and channels_last apply on CUDA only.
"""
from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dynloss import distributed
from dynloss.checkpoint import load_rng, load_state, restore, save_rng, save_state
from dynloss.config import Config
from dynloss.data import read_manifest, read_split, storage
from dynloss.data.batches import SHARD_COLUMNS, resolve_preset, views_from_rows
from dynloss.data.decode import mode_from_manifest
from dynloss.data.transforms import preset_for_source
from dynloss.dynamic import DynamicLoss
from dynloss.engine import MetaSettings, finetune_on_meta, per_sample_losses, predict, train_one_epoch
from dynloss.losses import build_loss, needs_class_counts
from dynloss.meta import build_meta_optimizer, unwrap
from dynloss.metrics import correction_metrics
from dynloss.models import build_model
from dynloss.sampling import hierarchical_sample, loss_ranks
from dynloss.schedules import build_scheduler
from pipelines.evaluate import eval_metrics, prediction_arrays

LABEL_REPORT = "label_report.parquet"
PER_CLASS = "per_class.json"
PER_CLASS_METRICS = 20  # classes up to which per-class accuracy is also an MLflow metric (eval/class/<index>)


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


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class Worker:
    """One worker's model, optimizers, loss and per-epoch steps (see the module docstring)."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, checkpoint_dir: str | None):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.manifest = read_manifest(cfg.data.path)
        train = self.manifest["splits"]["train"]
        self.num_classes, self.train_rows = int(self.manifest["num_classes"]), int(train["rows"])
        self.counts = [int(c) for c in train["counts"]]
        self.preset_name = cfg.data.preset or preset_for_source(self.manifest["source"])
        self.mode = mode_from_manifest(self.manifest)
        self.preset = resolve_preset(self.preset_name, mode=self.mode, **cfg.data.preset_params)
        cuda = device.type == "cuda"
        self.amp = torch.bfloat16 if cuda and cfg.train.amp != "off" and torch.cuda.is_bf16_supported() else None
        if cuda and cfg.train.amp == "on" and self.amp is None:
            raise ValueError("train.amp: on needs a GPU with bfloat16 (the meta step has no fp16 loss scaling); "
                             "use auto or off")
        self.channels_last = cuda and cfg.train.channels_last != "off"
        self.local_batch = cfg.train.batch_size // world

        torch.manual_seed(cfg.train.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
        model = build_model(cfg.model.name, self.num_classes, in_chans=self.preset.channels,
                            pretrained=cfg.model.pretrained).to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov)
        # Ray Data's equal split gives each worker at most floor(rows / world) rows
        self.steps_per_epoch = max(1, math.ceil((self.train_rows // world) / self.local_batch))
        self.scheduler = build_scheduler(self.optimizer, o.schedule, steps_per_epoch=self.steps_per_epoch,
                                         epochs=cfg.train.epochs, warmup_epochs=o.warmup_epochs,
                                         milestones=o.milestones, gamma=o.gamma)
        self.dyn = self.meta_optimizer = self.criterion = None
        if cfg.is_dynamic:
            d = cfg.dynamic
            # every DynamicLoss argument the dynamic section names (rank_buckets, margin_prior, rank_init, ...)
            knobs = {k: getattr(d, k) for k in inspect.signature(DynamicLoss).parameters if k in type(d).model_fields}
            counts = self.counts if d.margin_prior == "log_prior" else None
            self.dyn = DynamicLoss(self.num_classes, class_counts=counts, **knobs).to(device)
            self.meta_optimizer = build_meta_optimizer(self.dyn, d.meta_lr)
        else:
            params = dict(cfg.loss.params)
            if needs_class_counts(cfg.loss.name):
                params.setdefault("class_counts", self.counts)
            self.criterion = build_loss(cfg.loss.name, self.num_classes, preset=cfg.loss.preset, **params).to(device)
        shared = {f.name: getattr(cfg.dynamic, f.name) for f in fields(MetaSettings) if hasattr(cfg.dynamic, f.name)}
        self.settings = MetaSettings(**shared, max_grad_norm=o.max_grad_norm)

        self.start_epoch, self.iteration, self.rank_table = 0, 0, None
        torch.manual_seed(_seed(cfg.train.seed, 1, rank))  # Gumbel noise etc. differ between workers
        np.random.seed(_seed(cfg.train.seed, 2, rank))
        random.seed(_seed(cfg.train.seed, 3, rank))
        if checkpoint_dir is not None:
            state = load_state(checkpoint_dir, map_location=device)
            restore(state, model=model, optimizer=self.optimizer, scheduler=self.scheduler, dyn=self.dyn,
                    meta_optimizer=self.meta_optimizer, criterion=self.criterion)
            self.start_epoch, self.iteration = state["epoch"] + 1, state["iteration"]
            self.rank_table = state["rank_table"]
            load_rng(checkpoint_dir, rank)
        import ray.train.torch

        self.model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU) when world > 1
        self.inner = unwrap(self.model)  # inference passes skip DDP: workers see different numbers of batches
        self.clean_meta = read_split(cfg.sampling.clean_meta, "train", columns=list(SHARD_COLUMNS)) \
            if cfg.sampling.clean_meta else None
        self.corpus: dict[str, np.ndarray] | None = None  # last ranking pass, gathered, by id
        self.per_class: np.ndarray | None = None  # last evaluation's per-class accuracy

    # ------------------------------------------------------------------------------------------ batches
    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp) if self.amp is not None else nullcontext()

    def _x(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def _shard(self, name: str, batch_size: int, epoch: int):
        import ray.train

        from pipelines.data import iter_train_batches

        return iter_train_batches(ray.train.get_dataset_shard(name), batch_size=batch_size, device="cpu",
                                  epoch=epoch, seed=self.cfg.train.seed)

    def train_batches(self, epoch: int, exclude: np.ndarray | None, counter: dict) -> Iterator[dict]:
        """The epoch's training stream in engine form ({"id", "x", "label"}), meta rows left out."""
        view = self.cfg.data.train_view
        excl = torch.as_tensor(exclude) if exclude is not None and len(exclude) else None
        for b in self._shard("train", self.local_batch, epoch):
            counter["corrupt"] += int(b["corrupt"])
            ids, x, y = b["id"], b[view], b["label"]
            if excl is not None:
                keep = ~torch.isin(ids, excl)
                if bool(keep.any()):  # an all-meta batch stays whole: every worker must still step
                    ids, x, y = ids[keep], x[keep], y[keep]
            counter["images"] += len(ids)
            yield {"id": ids.to(self.device), "x": self._x(x), "label": y.to(self.device)}

    def _eval_batches(self, name: str, epoch: int) -> Iterator[dict]:
        for b in self._shard(name, self.local_batch * 2, epoch):
            yield {"id": b["id"], "x": self._x(b["x"]), "label": b["label"], "true_label": b["true_label"]}

    # ------------------------------------------------------------------------------------ ranking, meta
    def ranking_pass(self, epoch: int) -> dict[str, np.ndarray]:
        """CE of every training sample against its given label, gathered, sorted by id, with rank buckets."""
        with self.autocast():
            local = per_sample_losses(self.inner, self._eval_batches("rank", epoch))
        if not local:
            local = {k: np.zeros(0, np.int64) for k in ("id", "label", "pred", "true_label")} | \
                    {"loss": np.zeros(0, np.float32)}
        local = {k: local[k] for k in ("id", "label", "loss", "pred", "true_label")}
        full = distributed.all_gather_arrays(local)
        order = np.argsort(full["id"], kind="stable")
        corpus = {k: v[order] for k, v in full.items()}
        corpus["rank"] = loss_ranks(corpus["label"], corpus["loss"], self.cfg.dynamic.rank_buckets, self.num_classes)
        table = torch.zeros(self.train_rows, dtype=torch.long)
        table[torch.as_tensor(corpus["id"])] = torch.as_tensor(corpus["rank"])
        self.rank_table, self.corpus = table, corpus
        return corpus

    def meta_set(self, epoch: int) -> tuple[pa.Table, np.ndarray]:
        """(meta rows to learn phi from, training ids to leave out this epoch); the same on every worker."""
        s, c = self.cfg.sampling, self.corpus
        parts, exclude = [], np.zeros(0, np.int64)
        if self.clean_meta is not None:
            parts.append(self.clean_meta)
        if s.enrich or self.clean_meta is None:
            idx = hierarchical_sample(c["label"], c["loss"], s.ratio1, s.ratio2, s.criterion, s.per_class,
                                      seed=_seed(self.cfg.train.seed, 4, epoch))
            exclude = c["id"][idx]
            parts.append(read_rows_by_id(self.cfg.data.path, "train", exclude))
        return pa.concat_tables(parts), exclude

    def meta_batches(self, rows: pa.Table, epoch: int) -> Iterator[dict]:
        """Endless meta batches (``dynamic.meta_view``): this worker's slice of each global batch, reshuffled per pass."""
        n, w = len(rows), self.world
        size = min(self.cfg.meta_batch_size, n - n % w)
        if size < w:
            raise ValueError(f"the meta set has {n} rows, fewer than the {w} workers; raise sampling.ratio1 / "
                             "sampling.per_class")
        m, rng = size // w, np.random.default_rng(_seed(self.cfg.train.seed, 5, epoch))
        for rounds in itertools.count():
            order = rng.permutation(n)
            for start in range(0, n - size + 1, size):
                part = rows.take(pa.array(order[start + self.rank * m:start + (self.rank + 1) * m]))
                seed = _seed(self.cfg.train.seed, 6, epoch, rounds, start, self.rank)
                v = views_from_rows(part, self.preset, True, seed=seed)
                if len(v["label"]):
                    yield {"x": self._x(torch.from_numpy(v[self.cfg.dynamic.meta_view])),
                           "label": torch.from_numpy(v["label"]).to(self.device)}

    def finetune_batches(self, rows: pa.Table, epoch: int) -> Iterator[dict]:
        """One pass over the meta rows in global batches of train.batch_size, this worker's part of each."""
        n, w, view = len(rows), self.world, self.cfg.data.train_view
        order = np.random.default_rng(_seed(self.cfg.train.seed, 7, epoch)).permutation(n)
        for start in range(0, n, self.cfg.train.batch_size):
            chunk = order[start:start + self.cfg.train.batch_size]
            if len(chunk) < 2 * w:  # batch norm needs two samples per worker; every worker drops the same tail
                break
            part = rows.take(pa.array(np.array_split(chunk, w)[self.rank]))
            v = views_from_rows(part, self.preset, True, seed=_seed(self.cfg.train.seed, 8, epoch, start, self.rank))
            yield {"x": self._x(torch.from_numpy(v[view])), "label": torch.from_numpy(v["label"]).to(self.device)}

    # ------------------------------------------------------------------------------------------- epoch
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Ranking pass (when needed), one epoch of training, the meta-set fine-tune; synced statistics."""
        cfg, metrics, t0 = self.cfg, {}, time.perf_counter()
        if self.criterion is not None and hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(epoch, cfg.train.epochs)
        meta_phase = self.dyn is not None and epoch >= self.settings.warmup_epochs
        pretraining = self.dyn is not None and self.iteration < self.settings.corrector_pretrain_iters
        rows, exclude, stream = None, None, None
        if meta_phase or pretraining:
            self.ranking_pass(epoch)
            metrics["time/ranking_s"] = time.perf_counter() - t0
        if meta_phase:
            rows, exclude = self.meta_set(epoch)
            stream = self.meta_batches(rows, epoch)
            metrics["meta/set_size"] = float(len(rows))
            known = rows["true_label"].to_numpy() >= 0
            if known.any():
                given, true = rows["label"].to_numpy()[known], rows["true_label"].to_numpy()[known]
                metrics["meta/set_clean"] = float(np.mean(given == true))
        counter = {"corrupt": 0, "images": 0}
        vhook, mhook = distributed.meta_hooks()
        rank_table = self.rank_table.to(self.device) if self.rank_table is not None else None
        t1 = time.perf_counter()
        with self.autocast():
            stats, self.iteration = train_one_epoch(
                self.model, self.optimizer, self.train_batches(epoch, exclude, counter), epoch=epoch,
                settings=self.settings, criterion=self.criterion, dyn=self.dyn, meta_optimizer=self.meta_optimizer,
                rank_table=rank_table, meta_batches=stream, scheduler=self.scheduler, iteration=self.iteration,
                virtual_grad_hook=vhook, meta_grad_hook=mhook)
            if meta_phase and cfg.dynamic.finetune:
                stats.update(finetune_on_meta(self.model, self.optimizer, self.dyn, self.finetune_batches(rows, epoch),
                                              self.settings.max_grad_norm))
        train_s = time.perf_counter() - t1
        metrics.update(distributed.all_reduce_mean(stats))
        totals = distributed.all_reduce_sum({"corrupt": counter["corrupt"], "images": counter["images"]})
        metrics.update({"data/corrupt": totals["corrupt"], "train/images": totals["images"],
                        "time/images_per_s": totals["images"] / max(train_s, 1e-9),
                        "train/lr": self.optimizer.param_groups[0]["lr"]})
        return metrics

    def evaluate(self, epoch: int) -> dict[str, float]:
        batches = iter(self._eval_batches("eval", epoch))  # this worker's part of the eval split (may be none)
        first = next(batches, None)
        local = {"pred": np.zeros(0, np.int64), "label": np.zeros(0, np.int64), "top5_hit": np.zeros(0, bool)}
        if first is not None:
            with self.autocast():
                local = prediction_arrays(predict(self.inner, itertools.chain([first], batches)))
        full = distributed.all_gather_arrays(local)
        metrics, self.per_class = eval_metrics(full["pred"], full["label"], full["top5_hit"], self.counts,
                                               self.cfg.train.shot_thresholds)
        if self.num_classes <= PER_CLASS_METRICS:  # beyond that: per_class.json in the checkpoint only
            metrics.update({f"eval/class/{c}": float(a) for c, a in enumerate(self.per_class)})
        return metrics

    def trust(self) -> np.ndarray | None:
        """Trust w of every ranked training sample under the current corrector (curves[label, rank])."""
        if self.dyn is None or self.corpus is None:
            return None
        curves = self.dyn.corrector.curves().float().cpu().numpy()
        return curves[self.corpus["label"], self.corpus["rank"]]

    def trust_metrics(self) -> dict[str, float]:
        w = self.trust()
        if w is None or not (self.corpus["true_label"] >= 0).any():
            return {}
        m = correction_metrics(w, self.corpus["label"], self.corpus["true_label"])
        return {f"meta/{k}": v for k, v in m.items() if k in ("precision", "recall", "auc", "trust_clean",
                                                              "trust_noisy", "noise_rate", "flagged_rate")}

    def label_report(self, epoch: int) -> pa.Table:
        """id, given label, predicted label, trust w, true label, loss, rank: from a final ranking pass."""
        c = self.ranking_pass(epoch)
        w = self.trust()
        return pa.table({"id": c["id"], "label": c["label"], "pred": c["pred"],
                         "trust": w if w is not None else np.full(len(c["id"]), np.nan, np.float32),
                         "true_label": c["true_label"], "loss": c["loss"].astype(np.float32), "rank": c["rank"]})

    # ------------------------------------------------------------------------------------- checkpoint
    def save(self, directory: str, epoch: int, metrics: dict, report: pa.Table | None) -> None:
        """Rank 0 writes the state; every rank its RNG file (Ray Train merges the workers' directories)."""
        if self.rank == 0:
            save_state(directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, epoch=epoch,
                       iteration=self.iteration, config=self.cfg.resolved(), dyn=self.dyn,
                       meta_optimizer=self.meta_optimizer, rank_table=self.rank_table, criterion=self.criterion,
                       metrics=metrics, extra={"train_counts": self.counts, "num_classes": self.num_classes,
                                               "classes": list(self.manifest.get("classes") or []),
                                               "preset": self.preset_name, "mode": self.mode})
            if report is not None:
                pq.write_table(report, os.path.join(directory, LABEL_REPORT))
            if self.per_class is not None:
                names = list(self.manifest.get("classes") or range(self.num_classes))
                with open(os.path.join(directory, PER_CLASS), "w") as f:
                    json.dump({"classes": [str(n) for n in names], "train_counts": self.counts,
                               "accuracy": [None if np.isnan(a) else float(a) for a in self.per_class]}, f)
        save_rng(directory, self.rank)

    def plot_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if self.dyn is None:
            return None
        with torch.no_grad():
            margins = self.dyn.margins().float().cpu().numpy()
        counts = np.maximum(np.asarray(self.counts, float), 1.0)
        return margins, np.log(counts / counts.sum()), self.dyn.corrector.curves().float().cpu().numpy()
