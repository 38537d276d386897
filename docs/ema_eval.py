"""One Ray-free run of the engine, evaluated every epoch with the raw weights and with weight averages of several
decays side by side (what ``train.ema_decay`` evaluates; docs/method.md section 4, the asymmetric swings).

    OMP_NUM_THREADS=1 python docs/ema_eval.py --data data/fmnist_lt001_asym04 --seed 1 --decay 0.99 0.995 0.998 \
        --set loss.name=ce
    python docs/ema_eval.py --data data/fmnist_lt001_sym04 --decay 0.995 0.995w     # w: with train.ema_warmup
"""
import argparse
import json

import torch
from torch.optim.swa_utils import AveragedModel

from dynloss.builder import build_components, ema_update
from dynloss.config import check_dataset, load_config
from dynloss.epoch import TrainState, evaluate, run_epoch
from dynloss.local import load_data

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--config", default="pipelines/configs/fashion_mnist_lt.yaml")
p.add_argument("--data", required=True)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--decay", nargs="+", default=["0.995"],
               help="decays of the averages kept side by side; a trailing w warms the decay up (train.ema_warmup)")
p.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides, as dynloss train")
p.add_argument("--json", help="write the per-epoch rows here")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()
cfg = load_config(args.config, ["data.prepare=null", f"data.path={args.data}", f"train.seed={args.seed}",
                                "train.ema_decay=null", "train.ema_eval=always", *args.set])
c = build_components(cfg, check_dataset(cfg), args.device)
data, state = load_data(c), TrainState()
averages = {d: AveragedModel(c.inner, multi_avg_fn=ema_update(float(d.rstrip("w")), d.endswith("w")), use_buffers=True)
            for d in args.decay}
c.optimizer.register_step_post_hook(lambda opt, a, kw: [e.update_parameters(c.inner) for e in averages.values()])
rows = []
for epoch in range(cfg.train.epochs):
    trained = run_epoch(c, data, state, epoch)
    row, shots = {"epoch": epoch}, {}
    for name, e in [("raw", None)] + [(f"ema{d}", e) for d, e in averages.items()]:
        c.ema = e  # evaluate() takes the average the run keeps
        m = evaluate(c, data, state, epoch)[0]
        row[name] = m["eval/top1"]
        shots[name] = [m[f"eval/{k}_shot"] for k in ("many", "medium", "few")]
    c.ema = None
    row["shots"] = shots  # many / medium / few-shot accuracy of each
    row["train"] = {k: v for k, v in trained.items() if isinstance(v, (int, float))}  # trust, AUC, loss, ...
    rows.append(row)
    print(json.dumps(row), flush=True)
warmup = cfg.dynamic.warmup_epochs
for key in rows[0]:
    if key not in ("epoch", "shots", "train"):
        t = [r[key] for r in rows]
        drop = max((max(t[warmup:i + 1]) - t[i] for i in range(warmup, len(t))), default=float("nan"))
        shots = " / ".join(f"{100 * v:.2f}" for v in rows[-1]["shots"][key])
        print(f"{key:>9}: final {100 * t[-1]:.2f}  many / medium / few {shots}  "
              f"largest drop after warm-up {100 * drop:.1f}")
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f)
