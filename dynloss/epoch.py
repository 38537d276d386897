"""The epoch, written once: ranking pass, rank table, meta set, training, fine-tune, evaluation, trust.

Every driver calls ``run_epoch`` and ``evaluate`` with the components of ``dynloss.builder`` and an
``EpochData``, the small interface through which it supplies batches: the Ray Train worker
(``pipelines.train_worker.RayData``: Ray Data shards, DDP) and the Ray-free runner (``dynloss.local.InMemoryData``:
a prepared split decoded in memory). What differs between them is where rows come from, never what is done
with them: the rank table, the meta set, the order and size of the meta and fine-tune batches and every
statistic are decided here. Gathers and reductions go through ``dynloss.distributed`` (no-ops in one process).

Shape of an epoch (DESIGN.md section 3): warm-up epochs are supervised (CE, or CE with the generator's margins),
then every epoch: ranking pass -> rank table -> hierarchical meta set left out of the training stream ->
meta steps (``dynloss.engine.train_one_epoch``) -> one fine-tune pass over the meta set -> trust statistics.

    python -m dynloss.local --config pipelines/configs/digits.yaml --set train.epochs=3
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from dynloss import distributed
from dynloss.builder import Components, derive_seed
from dynloss.dynamic import OracleCorrector
from dynloss.engine import Batch, finetune_on_meta, per_sample_losses, predict, train_one_epoch
from dynloss.metrics import correction_metrics, eval_metrics, prediction_arrays
from dynloss.sampling import (agreeing_pool, clean_seed, flipped_labels, hierarchical_sample, loss_ranks,
                              meta_set_sizes)

PER_CLASS_METRICS = 20  # classes up to which per-class accuracy is also a metric (eval/class/<index>)
COLLAPSE_DROP = 0.05    # a top-1 this far below the run's best after warm-up is reported as a collapse
RANK_KEYS = ("id", "label", "loss", "pred", "fit_loss", "fit_pred", "true_label")


class EpochData(Protocol):
    """Where a driver's batches come from. Batches are dicts of CPU (or device) tensors.

    ``rank_batches`` / ``eval_batches``: this process's part of the train / eval split, each row once, the
    un-augmented view: ``{"id", "x", "label", "true_label"}``.
    ``train_batches``: this process's part of the epoch's training stream, ``{"id", "x", "label"}`` and
    optionally ``"corrupt"`` (images dropped while decoding); the engine leaves the meta rows out
    (``leave_out``).
    ``set_meta``: fix the epoch's meta set, these training ids plus any clean metadata the driver holds;
    returns its ``label`` and ``true_label`` arrays (row order = the index space of ``meta_batch``).
    ``meta_batch``: rows ``index`` of the meta set in ``view`` ("weak"/"strong"), augmentation seeded by ``seed``.
    """

    def rank_batches(self, epoch: int) -> Iterable[Batch]: ...
    def eval_batches(self, epoch: int) -> Iterable[Batch]: ...
    def train_batches(self, epoch: int) -> Iterable[Batch]: ...
    def set_meta(self, ids: np.ndarray, epoch: int) -> dict[str, np.ndarray]: ...
    def meta_batch(self, index: np.ndarray, view: str, seed: int) -> Batch: ...


@dataclass
class TrainState:
    """What carries from epoch to epoch (a checkpoint keeps ``iteration`` and ``rank_table``)."""
    iteration: int = 0
    rank_table: torch.Tensor | None = None          # id -> rank bucket of the last ranking pass
    corpus: dict[str, np.ndarray] | None = None     # that pass, gathered and sorted by id, with "rank"
    best_top1: float = float("nan")                 # best evaluation after warm-up (collapse watch)
    flipped: list[int] | None = None                # labels the flip check found (None: not checked yet)
    flip_ratio: float = float("nan")                # its smallest own / most-predicted-other ratio (that epoch's
    #                                                 metric; not kept in checkpoints, nothing reads it later)


def leave_out(batch: Batch, exclude: torch.Tensor | None) -> Batch:
    """The batch without the rows whose id is in ``exclude``; a batch made only of such rows stays whole, so
    every DDP worker still steps the same number of times."""
    if exclude is None or not len(exclude):
        return batch
    keep = ~torch.isin(batch["id"], exclude)
    if bool(keep.all()) or not bool(keep.any()):
        return batch
    return {k: v[keep] if torch.is_tensor(v) and v.dim() and len(v) == len(keep) else v for k, v in batch.items()}


def _inputs(c: Components, batches: Iterable[Batch]) -> Iterator[Batch]:
    """Images on the device, normalised (uint8 views) and in the model's memory format (``Components.input``); the
    engine moves the other tensors itself."""
    return ({**b, "x": c.input(b["x"])} for b in batches)


# ---------------------------------------------------------------------------------------------- ranking
def ranking_pass(c: Components, data: EpochData, state: TrainState, epoch: int) -> dict[str, np.ndarray]:
    """CE of every training sample against its given label (un-augmented view), gathered from every process,
    sorted by id, with its rank bucket; sets ``state.rank_table`` and ``state.corpus``. The corpus ``loss`` (what
    is ranked and what the meta set's "easy" picks) is CE of z, or of z + margins with ``dynamic.rank_loss:
    adjusted``; ``fit_pred`` is the argmax of z + margins (``sampling.meta_pool: agreeing``). With
    ``dynamic.flip_check`` the first pass after warm-up decides, once for the run (``state.flipped``), whether
    the noise looks class-dependent; if so every later pass ranks as ``rank_loss: adjusted`` + ``rank_within:
    all`` (and ``meta_ids`` draws from the agreeing pool)."""
    distributed.broadcast_buffers(c.inner)
    margins = None
    if c.dyn is not None:
        with torch.no_grad():
            margins = c.dyn.margins().float()
    with c.autocast():
        local = per_sample_losses(c.inner, _inputs(c, data.rank_batches(epoch)), margins)
    if not local:
        local = {k: np.zeros(0, np.float32 if k.endswith("loss") else np.int64) for k in RANK_KEYS}
    full = distributed.all_gather_arrays({k: local[k] for k in RANK_KEYS})
    order = np.argsort(full["id"], kind="stable")
    corpus = {k: v[order] for k, v in full.items()}
    d = c.cfg.dynamic
    if c.cfg.checks_flips and state.flipped is None and epoch >= c.settings.warmup_epochs:
        state.flipped, state.flip_ratio = flipped_labels(corpus["label"], corpus["pred"], c.num_classes, d.flip_check)
    class_dependent = bool(state.flipped)  # the flip check found a flipped label: rank as the two keys would
    if c.dyn is not None and (d.rank_loss == "adjusted" or class_dependent):
        corpus["loss"] = corpus["fit_loss"]
    if c.dyn is not None and isinstance(c.dyn.corrector, OracleCorrector):  # the upper bound: "rank" 1 = a right label
        if (corpus["true_label"] < 0).any():
            raise ValueError("dynamic.corrector: oracle needs the true labels (synthetic noise); this dataset has none")
        corpus["rank"] = (corpus["label"] == corpus["true_label"]).astype(np.int64)
    else:
        within = d.rank_within == "label" and not class_dependent
        groups = corpus["label"] if within else np.zeros_like(corpus["label"])
        corpus["rank"] = loss_ranks(groups, corpus["loss"], d.rank_buckets, c.num_classes)
    table = torch.zeros(c.train_rows, dtype=torch.long)
    table[torch.as_tensor(corpus["id"])] = torch.as_tensor(corpus["rank"])
    state.rank_table, state.corpus = table, corpus
    return corpus


def meta_ids(c: Components, corpus: dict[str, np.ndarray], epoch: int, agreeing: bool = False) -> np.ndarray:
    """The epoch's hierarchical sample of training ids (from every row, or from ``agreeing_pool`` with
    ``sampling.meta_pool: agreeing`` or ``agreeing`` - the flip check found class-dependent noise), the clean seed
    set (``sampling.clean_per_class``) always in; none when only clean metadata is used."""
    s = c.cfg.sampling
    if s.clean_meta and not s.enrich:
        return np.zeros(0, np.int64)
    clean = clean_seed(corpus["label"], corpus["true_label"], s.clean_per_class,
                       seed=derive_seed(c.cfg.train.seed, 10)) if s.clean_per_class else None
    label, pool = corpus["label"], np.arange(len(corpus["label"]))
    # the sizes come from every row's label, whatever the pool
    k1, k2 = meta_set_sizes(label, s.ratio1, s.ratio2, s.per_class)
    if s.meta_pool == "agreeing" or agreeing:  # rows whose label is the argmax of z + margins (topped up), + the
        #                                          clean seed set
        pool = np.union1d(agreeing_pool(label, corpus["fit_pred"] == label, corpus["loss"], k2),
                          clean if clean is not None else []).astype(np.int64)
    idx = hierarchical_sample(label[pool], corpus["loss"][pool], s.ratio1, s.ratio2, s.criterion, k1,
                              clean_ids=None if clean is None else np.searchsorted(pool, clean),
                              seed=derive_seed(c.cfg.train.seed, 4, epoch))
    return corpus["id"][pool[idx]]


# ------------------------------------------------------------------------------------------ meta batches
def meta_batches(c: Components, data: EpochData, n: int, epoch: int) -> Iterator[Batch]:
    """Endless meta batches of ``dynamic.meta_batch_size`` (global) over the ``n`` meta rows, reshuffled every
    pass, full batches only (a partial batch of a few images in train-mode batch norm is noise); each process
    takes an equal, disjoint slice, so the averaged meta-gradient is that of one global batch."""
    w, r, seed = distributed.world_size(), distributed.rank(), c.cfg.train.seed
    size = min(c.cfg.meta_batch_size, n - n % w)
    if size < w:
        raise ValueError(f"the meta set has {n} rows, fewer than the {w} workers; raise sampling.ratio1 / "
                         "sampling.per_class")
    m, rng = size // w, np.random.default_rng(derive_seed(seed, 5, epoch))
    for rounds in itertools.count():
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            yield data.meta_batch(order[start + r * m:start + (r + 1) * m], c.cfg.dynamic.meta_view,
                                  derive_seed(seed, 6, epoch, rounds, start, r))


def finetune_batches(c: Components, data: EpochData, n: int, epoch: int) -> Iterator[Batch]:
    """One pass over the ``n`` meta rows in global batches of ``train.batch_size`` (fewer rows: one batch of
    all), full batches only; each process its part of each batch."""
    w, r, seed, size = distributed.world_size(), distributed.rank(), c.cfg.train.seed, c.cfg.train.batch_size
    order = np.random.default_rng(derive_seed(seed, 7, epoch)).permutation(n)
    size = min(size, n - n % w)
    if size < 2 * w:  # batch norm needs two samples per worker
        return
    for start in range(0, n - size + 1, size):
        part = np.array_split(order[start:start + size], w)[r]
        yield data.meta_batch(part, c.cfg.dynamic.finetune_view or c.cfg.data.train_view,
                              derive_seed(seed, 8, epoch, start, r))


# ------------------------------------------------------------------------------------------------ epoch
def run_epoch(c: Components, data: EpochData, state: TrainState, epoch: int) -> dict[str, float]:
    """Ranking pass (when needed), one epoch of training, the meta-set fine-tune, trust statistics; the
    returned metrics are reduced over every process."""
    cfg, s, metrics, t0 = c.cfg, c.settings, {}, time.perf_counter()
    if c.criterion is not None and hasattr(c.criterion, "set_epoch"):
        c.criterion.set_epoch(epoch, cfg.train.epochs)
    meta_phase = c.dyn is not None and epoch >= s.warmup_epochs
    pretraining = c.dyn is not None and state.iteration < s.corrector_pretrain_iters
    ids, stream, n_meta = np.zeros(0, np.int64), None, 0
    if meta_phase or pretraining:
        unchecked = state.flipped is None
        ranking_pass(c, data, state, epoch)
        metrics["time/ranking_s"] = time.perf_counter() - t0
        if unchecked and state.flipped is not None:  # the flip check decided this epoch
            metrics.update({"rank/flipped_labels": float(len(state.flipped)), "rank/flip_ratio": state.flip_ratio})
    if meta_phase:
        if cfg.dynamic.margin_prior == "log_prior" and cfg.dynamic.prior_from == "trusted":
            # the labels the loss fits are the trusted ones: their class counts set the logit adjustment
            c.dyn.set_class_counts(np.bincount(state.corpus["label"], weights=trust(c, state), minlength=c.num_classes))
        ids = meta_ids(c, state.corpus, epoch, agreeing=bool(state.flipped))
        rows = data.set_meta(ids, epoch)
        n_meta = len(rows["label"])
        stream = meta_batches(c, data, n_meta, epoch)
        metrics["meta/set_size"] = float(n_meta)
        known = rows["true_label"] >= 0
        if known.any():
            metrics["meta/set_clean"] = float(np.mean(rows["label"][known] == rows["true_label"][known]))
    counter = {"corrupt": 0, "images": 0}
    excl = torch.as_tensor(ids) if len(ids) and cfg.sampling.leave_out else None

    def train_stream() -> Iterator[Batch]:
        for b in data.train_batches(epoch):
            b = leave_out(b, excl)
            counter["corrupt"] += int(b.get("corrupt", 0))
            counter["images"] += len(b["label"])
            yield {"id": b["id"], "x": c.input(b["x"]), "label": b["label"]}

    vhook, mhook = distributed.meta_hooks()
    rank_table = state.rank_table.to(c.device) if state.rank_table is not None else None
    t1 = time.perf_counter()
    with c.autocast():
        stats, state.iteration = train_one_epoch(
            c.model, c.optimizer, train_stream(), epoch=epoch, settings=s, criterion=c.criterion, dyn=c.dyn,
            meta_optimizer=c.meta_optimizer, rank_table=rank_table,
            meta_batches=_inputs(c, stream) if stream is not None else None, scheduler=c.scheduler,
            iteration=state.iteration, virtual_grad_hook=vhook, meta_grad_hook=mhook)
        if meta_phase and s.finetune:
            stats.update(finetune_on_meta(c.model, c.optimizer, c.dyn,
                                          _inputs(c, finetune_batches(c, data, n_meta, epoch)), s.max_grad_norm))
    train_s = time.perf_counter() - t1
    metrics.update(distributed.all_reduce_mean(stats))
    totals = distributed.all_reduce_sum(counter)
    metrics.update({"data/corrupt": totals["corrupt"], "train/images": totals["images"],
                    "time/images_per_s": totals["images"] / max(train_s, 1e-9),
                    "train/lr": c.optimizer.param_groups[0]["lr"]})
    metrics.update(trust_metrics(c, state))
    metrics.update(margin_metrics(c))
    return metrics


# ------------------------------------------------------------------------------------------- statistics
def averaged(c: Components, state: TrainState) -> bool:
    """Whether evaluation uses the weight average: the run keeps one (``train.ema_decay``) and evaluates it always,
    or (``train.ema_eval: flipped``) the flip check has found class-dependent noise."""
    return c.ema is not None and c.cfg.train.evaluates_average(state.flipped)


def evaluate(c: Components, data: EpochData, state: TrainState, epoch: int) -> tuple[dict[str, float], np.ndarray]:
    """(``eval/*`` metrics, per-class accuracy) on the eval split, gathered from every process; of the weight
    average when ``averaged`` (``eval/averaged`` says which)."""
    model = c.ema.module if averaged(c, state) else c.inner
    distributed.broadcast_buffers(model)  # batch-norm statistics are per process: evaluate rank 0's
    with c.autocast():
        out = predict(model, _inputs(c, data.eval_batches(epoch)))
    local = prediction_arrays(out) if out["label"].size else \
        {"pred": np.zeros(0, np.int64), "label": np.zeros(0, np.int64), "top5_hit": np.zeros(0, bool)}
    full = distributed.all_gather_arrays(local)
    metrics, per_class = eval_metrics(full["pred"], full["label"], full["top5_hit"], c.counts,
                                      c.cfg.train.shot_thresholds)
    if c.num_classes <= PER_CLASS_METRICS:
        metrics.update({f"eval/class/{k}": float(a) for k, a in enumerate(per_class)})
    metrics["eval/averaged"] = float(model is not c.inner)
    return metrics, per_class


def flip_notice(c: Components, state: TrainState, metrics: dict[str, float]) -> str | None:
    """The line a driver prints the epoch the flip check decided (``dynamic.flip_check``), else None."""
    if "rank/flipped_labels" not in metrics:
        return None
    limit, ratio = c.cfg.dynamic.flip_check, metrics["rank/flip_ratio"]
    if not state.flipped:
        return (f"flip check: no label looks flipped (smallest own / other prediction ratio {ratio:.3f}, "
                f">= {limit}): ranking as configured")
    return (f"flip check: label(s) {', '.join(map(str, state.flipped))} look flipped from or into another class "
            f"(own / other prediction ratio {ratio:.3f} < {limit}): class-dependent noise, ranking every "
            "row by CE of z + margins and drawing the metadata from rows the classifier agrees with from now on "
            "(dynamic.rank_loss: adjusted, rank_within: all; sampling.meta_pool: agreeing)"
            + ("; evaluating the weight average (train.ema_eval: flipped)"
               if c.ema is not None and c.cfg.train.ema_eval == "flipped" else ""))


def watch_collapse(c: Components, state: TrainState, metrics: dict[str, float], epoch: int) -> str | None:
    """After warm-up (``dynamic.warmup_epochs``, for every loss, so runs compare), flag an evaluation more than
    COLLAPSE_DROP below the run's best (``eval/collapse``); returns the warning line to print, or None."""
    top1 = metrics.get("eval/top1")
    if top1 is None or math.isnan(top1) or epoch < c.settings.warmup_epochs:
        return None
    best = state.best_top1
    state.best_top1 = top1 if math.isnan(best) else max(best, top1)
    metrics["eval/collapse"] = float(not math.isnan(best) and top1 < best - COLLAPSE_DROP)
    if metrics["eval/collapse"]:
        return (f"warning: epoch {epoch + 1}: top-1 {top1:.1%} is {best - top1:.1%} below this run's best {best:.1%} "
                "after warm-up (a collapse; see docs/method.md)")
    return None


def trust(c: Components, state: TrainState) -> np.ndarray | None:
    """Trust w of every ranked training sample under the current corrector (curves[label, rank])."""
    if c.dyn is None or state.corpus is None:
        return None
    curves = c.dyn.corrector.curves().float().cpu().numpy()
    return curves[state.corpus["label"], state.corpus["rank"]]


def trust_metrics(c: Components, state: TrainState) -> dict[str, float]:
    w = trust(c, state)
    if w is None or not (state.corpus["true_label"] >= 0).any():
        return {}
    m = correction_metrics(w, state.corpus["label"], state.corpus["true_label"])
    return {f"meta/{k}": v for k, v in m.items() if k in ("precision", "recall", "auc", "trust_clean",
                                                          "trust_noisy", "noise_rate", "flagged_rate")}


def margin_metrics(c: Components) -> dict[str, float]:
    """How far the generated margins moved from logit adjustment: the slope of (margins - mean) on the centred
    log prior (1 = logit adjustment, 0 = flat) and the rare-minus-frequent residual."""
    if c.dyn is None:
        return {}
    with torch.no_grad():
        m = c.dyn.margins().float().cpu().numpy()
    counts = np.maximum(np.asarray(c.counts, float), 1.0)
    lp = np.log(counts / counts.sum())
    lpc, mc = lp - lp.mean(), m - m.mean()
    slope = float(mc @ lpc / max(lpc @ lpc, 1e-12)) if np.ptp(lp) > 0 else float("nan")
    resid = mc - lpc
    return {"meta/margin_slope": slope, "meta/margin_rare_minus_frequent": float(resid[counts.argmin()]
                                                                                - resid[counts.argmax()])}
