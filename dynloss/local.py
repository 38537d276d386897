"""Ray-free, single-process training of one loss on a prepared dataset held in memory.

The reference driver of the engine: the per-epoch shape of DESIGN.md section 3 (ranking pass, rank table,
hierarchical meta set left out of the epoch, meta steps, fine-tune pass, evaluation) for small array
datasets (digits, Fashion-MNIST, CIFAR) on one device. The Ray Train loop runs the same engine functions
over Ray Data shards; this one is what the library tests and quick comparisons use.

    python -m dynloss.local --data data/fashion-mnist-lt --losses ce dynamic --epochs 10
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dynloss.data.batches import load_split_numpy
from dynloss.data.manifest import read_manifest
from dynloss.data.transforms import build_preset, preset_for_source
from dynloss.dynamic import DynamicLoss
from dynloss.engine import MetaSettings, finetune_on_meta, per_sample_losses, predict, train_one_epoch
from dynloss.losses import build_loss, needs_class_counts
from dynloss.meta import build_meta_optimizer
from dynloss.metrics import correction_metrics
from dynloss.models import build_model
from dynloss.sampling import hierarchical_sample, loss_ranks


@dataclass
class LocalRun:
    """What to train: the loss, the classifier, the schedule and the Dynamic Loss knobs."""
    loss: str = "dynamic"
    loss_params: dict = field(default_factory=dict)
    model: str = "small_cnn"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    meta: MetaSettings = field(default_factory=lambda: MetaSettings(warmup_epochs=3))
    meta_lr: float = 3e-3
    meta_batch_size: int = 128
    margin_prior: str = "log_prior"
    rank_init: str = "xavier"
    ratio1: float = 0.5
    ratio2: float = 0.5
    criterion: str = "easy"
    view: str = "weak"         # training stream
    meta_view: str = "strong"  # meta batches and the fine-tune pass (the authors' choice)
    seed: int = 0


@dataclass
class Split:
    """A split decoded in memory (uint8 images) plus its labels."""
    images: torch.Tensor
    label: torch.Tensor
    true_label: torch.Tensor

    @classmethod
    def load(cls, root: str, split: str) -> Split:
        d = load_split_numpy(root, split)
        return cls(torch.from_numpy(d["images"]), torch.from_numpy(d["label"]), torch.from_numpy(d["true_label"]))

    def batches(self, ids: torch.Tensor, batch_size: int, preset, view: str | None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches over ``ids``; ``view`` "weak"/"strong" augments and shuffles, None is the eval view.

        Only the requested view is computed; randomness comes from torch's global generator (seeded per run).
        """
        if view is not None:
            ids = ids[torch.randperm(len(ids))]
        transform = preset.eval if view is None else getattr(preset, view)
        for i in range(0, len(ids), batch_size):
            j = ids[i:i + batch_size]
            x = torch.stack([transform(img) for img in self.images[j]])
            yield {"id": j, "x": x, "label": self.label[j], "true_label": self.true_label[j]}


def _cycle(make: Callable[[], Iterator]) -> Iterator:
    while True:
        yield from make()


@dataclass
class LocalResult:
    history: list[dict[str, float]]   # per-epoch statistics, last = final
    model: torch.nn.Module
    dyn: DynamicLoss | None
    test_pred: dict[str, np.ndarray]  # the final evaluation's predictions


def train_local(run: LocalRun, train: Split, test: Split, preset, num_classes: int,
                log: Callable[[str], None] = print) -> LocalResult:
    """Train ``run.loss`` on ``train``; evaluate on ``test`` every epoch."""
    torch.manual_seed(run.seed)
    counts = np.bincount(train.label.numpy(), minlength=num_classes)
    model = build_model(run.model, num_classes, in_chans=preset.channels)
    n = len(train.label)
    steps = run.epochs * -(-n // run.batch_size) + run.epochs * 10  # meta-set fine-tune passes are short
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=run.lr, total_steps=steps)
    dyn = meta_opt = criterion = None
    if run.loss == "dynamic":
        dyn = DynamicLoss(num_classes, class_counts=counts, margin_prior=run.margin_prior, rank_init=run.rank_init)
        meta_opt = build_meta_optimizer(dyn, run.meta_lr)
    else:
        extra = {"class_counts": counts.tolist()} if needs_class_counts(run.loss) else {}
        criterion = build_loss(run.loss, num_classes, **extra, **run.loss_params)
    all_ids = torch.arange(n)
    rank_table = torch.zeros(n, dtype=torch.long)
    history, iteration, t0 = [], 0, time.time()
    for epoch in range(run.epochs):
        if criterion is not None:
            criterion.set_epoch(epoch, run.epochs)
        meta_ids, meta_batches, ranked = torch.empty(0, dtype=torch.long), None, None
        if dyn is not None and (epoch >= run.meta.warmup_epochs or iteration < run.meta.corrector_pretrain_iters):
            ranked = per_sample_losses(model, train.batches(all_ids, 512, preset, None))
            rank_table[torch.from_numpy(ranked["id"])] = torch.from_numpy(
                loss_ranks(ranked["label"], ranked["loss"], dyn.corrector.rank_buckets))
            if epoch >= run.meta.warmup_epochs:
                meta_ids = torch.from_numpy(ranked["id"][hierarchical_sample(
                    ranked["label"], ranked["loss"], run.ratio1, run.ratio2, run.criterion, seed=run.seed + epoch)])
                meta_batches = _cycle(lambda: train.batches(meta_ids, run.meta_batch_size, preset, run.meta_view))
        stream = all_ids[~torch.isin(all_ids, meta_ids)]
        stats, iteration = train_one_epoch(
            model, optimizer, train.batches(stream, run.batch_size, preset, run.view), epoch=epoch,
            settings=run.meta, criterion=criterion, dyn=dyn, meta_optimizer=meta_opt, rank_table=rank_table,
            meta_batches=meta_batches, scheduler=scheduler, iteration=iteration)
        if meta_batches is not None and run.meta.finetune:
            stats.update(finetune_on_meta(model, optimizer, dyn, train.batches(meta_ids, run.batch_size, preset,
                                                                                  run.meta_view)))
        pred = predict(model, test.batches(torch.arange(len(test.label)), 1000, preset, None))
        stats["eval/top1"] = float((pred["pred"] == pred["true_label"]).mean())
        if ranked is not None and dyn is not None and bool((train.true_label >= 0).all()):
            with torch.no_grad():
                trust = dyn.corrector.trust(rank_table, train.label).numpy()
            c = correction_metrics(trust, train.label.numpy(), train.true_label.numpy())
            stats.update({"meta/trust_clean": c["trust_clean"], "meta/trust_noisy": c["trust_noisy"],
                          "meta/auc": c["auc"]})
        stats["epoch"], stats["time/s"] = epoch, time.time() - t0
        history.append(stats)
        log(f"[{run.loss}] epoch {epoch + 1}/{run.epochs} " + " ".join(
            f"{k}={v:.4f}" for k, v in stats.items() if k not in ("epoch",)))
    return LocalResult(history, model, dyn, pred)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dynloss.local", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a directory written by `dynloss prepare`")
    ap.add_argument("--losses", nargs="+", default=["ce", "dynamic"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--scope", choices=("full", "head"), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--meta-view", choices=("weak", "strong"), default="strong")
    args = ap.parse_args(argv)
    manifest = read_manifest(args.data)
    preset = build_preset(preset_for_source(manifest["source"]))
    train, test = Split.load(args.data, "train"), Split.load(args.data, "test")
    results = {}
    for loss in args.losses:
        run = LocalRun(loss=loss, epochs=args.epochs, seed=args.seed, meta_view=args.meta_view,
                       meta=MetaSettings(scope=args.scope, warmup_epochs=min(3, args.epochs - 1)))
        results[loss] = train_local(run, train, test, preset, manifest["num_classes"]).history[-1]
    print(f"\n{'loss':<16}{'clean-test top-1':>18}{'time (s)':>10}")
    for loss, last in results.items():
        print(f"{loss:<16}{last['eval/top1']:>18.4f}{last['time/s']:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
