"""The plain PyTorch loop that docs/method.md compares the pipeline with (DESIGN.md section 8's calibration loop).

No dynloss engine: the prepared split in memory, pixels / 255, random horizontal flip only, SGD lr 0.05 momentum 0.9
weight decay 5e-4, torch's OneCycleLR over all steps, batch 128, reshuffled every epoch, evaluated once at the end.

    python docs/plain_loop.py --data data/fmnist_lt001_sym04 --loss logit_adjusted --epochs 10 [--model small_cnn]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from dynloss.data.batches import load_split_numpy
from dynloss.models import build_model


def plain_cnn(num_classes: int, in_chans: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_chans, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--loss", choices=("ce", "logit_adjusted"), default="ce")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--model", default="plain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean", action="store_true", help="train on the true labels (the ceiling)")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    tr, te = load_split_numpy(a.data, "train"), load_split_numpy(a.data, "test")
    x = torch.from_numpy(tr["images"]).float() / 255
    y = torch.from_numpy(tr["true_label" if a.clean else "label"])
    xt, yt = torch.from_numpy(te["images"]).float() / 255, torch.from_numpy(te["true_label"])
    c = int(max(y.max(), yt.max())) + 1
    counts = torch.bincount(y, minlength=c).float()
    adjust = torch.log(counts / counts.sum()) if a.loss == "logit_adjusted" else torch.zeros(c)
    model = plain_cnn(c, x.shape[1]) if a.model == "plain" else build_model(a.model, c, in_chans=x.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = a.epochs * -(-len(y) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    t0 = time.time()
    for _ in range(a.epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(128):
            xb = x[idx]
            flip = torch.rand(len(idx)) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = F.cross_entropy(model(xb) + adjust, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in xt.split(1000)])
    print(f"{a.loss} model={a.model} epochs={a.epochs} seed={a.seed} clean={a.clean}: "
          f"top-1 {float((pred == yt).float().mean()):.4f} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
