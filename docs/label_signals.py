"""After the warm-up, how well each per-sample signal finds the wrong labels, class by class, and how clean each
class's meta set is (docs/method.md section 4, asymmetric noise). Same config, components and epochs as
``dynloss train`` (through the Ray-free runner); the true labels of the synthetic noise score the signals.

    python docs/label_signals.py --data data/fmnist_lt001_asym04 --seed 1
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from dynloss.builder import build_components
from dynloss.config import check_dataset, load_config
from dynloss.epoch import TrainState, ranking_pass, run_epoch
from dynloss.local import load_data
from dynloss.metrics import roc_auc
from dynloss.sampling import hierarchical_sample

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--config", default="pipelines/configs/fashion_mnist_lt.yaml")
p.add_argument("--data", required=True)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--epochs", type=int, help="epochs to train first (default: the config's warm-up)")
p.add_argument("--knn", type=int, default=20, help="neighbours of the feature-space signal")
args = p.parse_args()
# corpus "loss" stays CE of z (the authors' ranking); "fit_loss" is CE of z + margins
cfg = load_config(args.config, [f"data.path={args.data}", f"train.seed={args.seed}", "dynamic.rank_loss=logits"])
c = build_components(cfg, check_dataset(cfg), "cpu")
data, state = load_data(c), TrainState()
for epoch in range(cfg.dynamic.warmup_epochs if args.epochs is None else args.epochs):
    run_epoch(c, data, state, epoch)
corpus = ranking_pass(c, data, state, 0)
y, wrong = corpus["label"], corpus["label"] != corpus["true_label"]


@torch.no_grad()
def knn_disagreement(k: int) -> tuple[np.ndarray, np.ndarray]:
    """1 - the share of a row's ``k`` nearest training rows (cosine of the penultimate features) that carry its
    label, plain and balanced (each label's votes divided by its row count first): a signal that is not the
    classifier's own argmax (docs/method.md section 4, session 8). One feature pass and one neighbour search."""
    c.inner.eval()
    ids, feats = [], []
    for b in data.rank_batches(0):
        ids.append(b["id"])
        feats.append(F.normalize(c.inner.features(c.input(b["x"])).float(), dim=1).cpu())
    c.inner.train()
    f = torch.cat(feats)[torch.as_tensor(np.argsort(torch.cat(ids).numpy(), kind="stable"))]
    lab = torch.as_tensor(y)
    inv_prior = 1.0 / torch.bincount(lab, minlength=c.num_classes).clamp(min=1).float()
    plain, balanced = np.empty(len(lab), np.float32), np.empty(len(lab), np.float32)
    for s in range(0, len(lab), 2048):
        sim = f[s:s + 2048] @ f.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -2  # not itself
        nb = lab[sim.topk(k, dim=1).indices]  # (n, k) labels of the neighbours
        votes = torch.zeros(len(nb), c.num_classes).scatter_add_(1, nb, torch.ones_like(nb, dtype=torch.float))
        own = (torch.arange(len(nb)), lab[s:s + len(nb)])
        for out, v in ((plain, votes), (balanced, votes * inv_prior)):
            out[s:s + len(nb)] = 1 - (v / v.sum(1, keepdim=True))[own].numpy()
    return plain, balanced


knn_plain, knn_balanced = knn_disagreement(args.knn)
signals = {"CE of z": corpus["loss"], "CE of z + m": corpus["fit_loss"],
           f"kNN{args.knn}": knn_plain, f"kNN{args.knn} bal": knn_balanced}
agree = corpus["fit_pred"] == y
agree_z = corpus["pred"] == y  # the argmax of z alone (the balanced prediction, what evaluation uses)
meta_all = hierarchical_sample(y, corpus["loss"], cfg.sampling.ratio1, cfg.sampling.ratio2, seed=1)
print(f"{'label':>5} {'rows':>5} {'wrong':>6} " + " ".join(f"{'AUC ' + n:>15}" for n in signals)
      + f" {'meta clean (all)':>17} {'agreeing rows':>14} {'their wrong':>12} {'agree z':>8} {'their wrong':>12}"
      + f" {'right labels agreeing':>22} {'z':>5}")
for k in range(c.num_classes):
    rows = y == k
    aucs = [roc_auc(s[rows], wrong[rows]) for s in signals.values()]
    picked = meta_all[y[meta_all] == k]
    print(f"{k:>5} {rows.sum():>5} {wrong[rows].mean():>6.2f} " + " ".join(f"{a:>15.3f}" for a in aucs)
          + f" {1 - wrong[picked].mean():>17.2f} {(rows & agree).sum():>14} {wrong[rows & agree].mean():>12.2f}"
          + f" {(rows & agree_z).sum():>8} {wrong[rows & agree_z].mean():>12.2f}"
          + f" {agree[rows & ~wrong].mean():>22.2f} {agree_z[rows & ~wrong].mean():>5.2f}")
print("all rows: " + ", ".join(f"AUC {n} {roc_auc(s, wrong):.3f}" for n, s in signals.items()))
