"""One epoch of training, the per-epoch ranking pass and evaluation: the loop bodies every runner shares.

``dynloss.epoch.run_epoch`` strings these together for every driver (the Ray Train worker and the Ray-free
runner); nothing here knows about Ray. Batches are dicts of tensors:

  train batch   {"id": (B,), "x": (B, ...), "label": (B,)}         the epoch's training stream
  meta batch    {"x": (M, ...), "label": (M,)}                      drawn from the epoch's meta set
  rank/eval     {"id": (B,), "x": (B, ...), "label": (B,), "true_label": (B,)}   un-augmented view

Shape of an epoch (DESIGN.md section 3): warm-up epochs are CE, or CE with the generator's margins
(``warmup_loss``), and the bounded corrector pre-training;
afterwards the ranking pass fixes the rank table and the meta set, every iteration is a meta step
(every ``meta_interval``-th; the others are actual steps with the current phi), then one fine-tune pass
over the meta set.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynloss.dynamic import DynamicLoss
from dynloss.meta import GradHook, MetaBatch, ce_step, meta_step, pretrain_corrector_step, unwrap

Batch = dict[str, Tensor]


@dataclass
class MetaSettings:
    """The Dynamic Loss knobs the loop needs (the config schema holds the same names)."""
    scope: str = "full"
    meta_interval: int = 1
    warmup_epochs: int = 5
    corrector_pretrain_iters: int = 0
    mix: str = "gumbel"
    finetune: bool = True
    max_grad_norm: float | None = None
    warmup_loss: str = "ce"       # "ce" (authors) or "margins": CE(z + m), the generator's margins, no grad
    pseudo_from: str = "logits"   # p~ drawn from z (authors) or "adjusted": from z + m (dynloss.meta.meta_step)
    meta_grad: str = "jvp"        # scope full: "jvp" (exact, at the logits), "finite_difference", "double_backward"


@dataclass
class EpochStats:
    """Running sums kept as tensors on the device: one host sync per epoch, in ``summary``."""
    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: Tensor, n: int = 1) -> None:
        v = value.detach().float().sum() if value.dim() else value.detach().float() * n
        self.sums[name] = self.sums[name] + v if name in self.sums else v
        self.counts[name] = self.counts.get(name, 0) + n

    def summary(self) -> dict[str, float]:
        return {k: float(v) / max(self.counts[k], 1) for k, v in self.sums.items()}


def _device_of(model: nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def per_sample_losses(model: nn.Module, batches: Iterable[Batch], margins: Tensor | None = None
                      ) -> dict[str, np.ndarray]:
    """The ranking pass: CE against the given label of every sample on its un-augmented view.

    Returns numpy arrays ``id``, ``label``, ``loss`` (CE of the logits z), ``pred`` (argmax z: the prediction),
    ``fit_loss`` and ``fit_pred`` (the same of z + ``margins``, the logits the Dynamic Loss fits; equal to
    ``loss`` and ``pred`` without margins) and ``true_label`` (when batches have it).
    """
    model.eval()
    device = _device_of(model)
    keys = ("id", "label", "loss", "pred", "fit_loss", "fit_pred", "true_label")
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    for b in batches:
        b = _to(b, device)
        logits = model(b["x"]).float()
        fit = logits if margins is None else logits + margins
        out["id"].append(b["id"])
        out["label"].append(b["label"])
        out["loss"].append(F.cross_entropy(logits, b["label"], reduction="none"))
        out["pred"].append(logits.argmax(1))
        out["fit_loss"].append(F.cross_entropy(fit, b["label"], reduction="none"))
        out["fit_pred"].append(fit.argmax(1))
        if "true_label" in b:
            out["true_label"].append(b["true_label"])
    model.train()
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items() if v}


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], *,
                    epoch: int, settings: MetaSettings, criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
                    dyn: DynamicLoss | None = None, meta_optimizer: torch.optim.Optimizer | None = None,
                    rank_table: Tensor | None = None, meta_batches: Iterator[Batch] | None = None,
                    scheduler=None, iteration: int = 0, virtual_grad_hook: GradHook | None = None,
                    meta_grad_hook=None) -> tuple[dict[str, float], int]:
    """Train ``model`` for one pass over ``batches``; returns (mean statistics, next global iteration).

    With ``dyn`` None this is a plain supervised epoch with ``criterion`` (the robust-loss baselines).
    With ``dyn`` given, epochs before ``settings.warmup_epochs`` are CE warm-up; later ones need
    ``rank_table`` (id -> rank bucket, on the model's device) and ``meta_batches``.
    """
    device = _device_of(model)
    model.train()
    stats = EpochStats()
    meta_phase = dyn is not None and epoch >= settings.warmup_epochs
    warm_margins = None
    if dyn is not None and not meta_phase and settings.warmup_loss == "margins":
        with torch.no_grad():  # logit-adjusted CE from the start when the margins start at the log prior
            warm_margins = dyn.margins().float().to(device)
    for b in batches:
        b = _to(b, device)
        x, y = b["x"], b["label"]
        if meta_phase:
            meta = None
            if iteration % settings.meta_interval == 0:
                mb = _to(next(meta_batches), device)
                meta = MetaBatch(mb["x"], mb["label"])
            out = meta_step(model, dyn, optimizer, meta_optimizer, x, y, rank_table[b["id"]], meta,
                            scope=settings.scope, mix=settings.mix, pseudo_from=settings.pseudo_from,
                            virtual_grad_hook=virtual_grad_hook, meta_grad_hook=meta_grad_hook,
                            max_grad_norm=settings.max_grad_norm, meta_grad=settings.meta_grad)
            stats.add("train/trust", out["trust"], len(y))
            if "meta/loss" in out:
                stats.add("meta/loss", out["meta/loss"])
        else:
            out = ce_step(model, optimizer, x, y, criterion if dyn is None else None, margins=warm_margins,
                          max_grad_norm=settings.max_grad_norm)
            if dyn is not None and iteration < settings.corrector_pretrain_iters:
                rt = rank_table[b["id"]] if rank_table is not None else torch.zeros_like(y)
                stats.add("meta/pretrain_loss", pretrain_corrector_step(dyn, meta_optimizer, y, rt, out["logits"],
                                                                          meta_grad_hook))
                if iteration + 1 == settings.corrector_pretrain_iters:
                    # stale second moments from pre-training would dwarf the meta-gradients that follow
                    meta_optimizer.state.clear()
        stats.add("train/loss", out["train/loss"])
        stats.add("train/acc", (out["logits"].argmax(1) == y).float(), len(y))
        if scheduler is not None:
            scheduler.step()
        iteration += 1
    return stats.summary(), iteration


def finetune_on_meta(model: nn.Module, optimizer: torch.optim.Optimizer, dyn: DynamicLoss,
                     batches: Iterable[Batch], max_grad_norm: float | None = None) -> dict[str, float]:
    """After a meta epoch: one pass over the meta set with CE(z + m, y), m from the generator, no grad.

    The meta set is class-balanced already, so the log-prior part of the margins (``margin_prior``) is left
    out here: adding it on balanced data would push the classifier towards the rare classes twice.
    """
    device = _device_of(model)
    with torch.no_grad():
        margins = dyn.margins(include_prior=False)
    stats = EpochStats()
    model.train()
    for b in batches:
        b = _to(b, device)
        out = ce_step(model, optimizer, b["x"], b["label"], margins=margins.to(device), max_grad_norm=max_grad_norm)
        stats.add("finetune/loss", out["train/loss"])
    return stats.summary()


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
    """Logits-derived predictions on an evaluation split: ``pred``, ``top5``, ``label``, ``true_label``."""
    model.eval()
    device = _device_of(model)
    out: dict[str, list[Tensor]] = {"pred": [], "top5": [], "label": [], "true_label": []}
    for b in batches:
        b = _to(b, device)
        logits = model(b["x"]).float()
        k = min(5, logits.shape[1])
        out["pred"].append(logits.argmax(1))
        out["top5"].append(logits.topk(k, 1).indices)
        out["label"].append(b["label"])
        out["true_label"].append(b.get("true_label", b["label"]))
    model.train()
    if not out["pred"]:  # a DDP worker whose part of the split is empty
        return {k: np.zeros(0, np.int64) for k in out}
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}
