"""The Ray-free runner: the epoch of ``dynloss train`` on one device, a prepared split decoded in memory.

Same config (``--config`` + ``--set``, validated as a whole), same components (``dynloss.builder``), same epoch
(``dynloss.epoch``): only the data comes from memory instead of Ray Data shards, so method sweeps and quick
comparisons run without a Ray runtime (e.g. on a GPU machine with torch alone). For small array datasets
(digits, Fashion-MNIST, CIFAR) that fit in memory; the dataset must be prepared (``dynloss prepare``, or one
``dynloss train`` run of the config). Checkpoints, MLflow and multi-GPU are ``dynloss train``'s.

    python -m dynloss.local --config pipelines/configs/fashion_mnist_lt.yaml --compare logit_adjusted dynamic
    python -m dynloss.local --config pipelines/configs/digits.yaml --set train.epochs=3 --set train.seed=1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dynloss.builder import Components, build_components, derive_seed
from dynloss.config import Config, ConfigError, check_dataset, load_config
from dynloss.data.batches import batch_seed, load_split_numpy
from dynloss.data.transforms import view_batch
from dynloss.epoch import TrainState, evaluate, flip_notice, run_epoch, watch_collapse
from dynloss.report import compare_table, final_line

EVAL_BATCH = 512


class Arrays:
    """A split decoded in memory (uint8 images), addressable by row id."""

    def __init__(self, d: dict):
        self.id, self.label, self.true_label = (torch.from_numpy(d[k]) for k in ("id", "label", "true_label"))
        self.images = torch.from_numpy(d["images"])
        self.row = {int(i): r for r, i in enumerate(d["id"])} if len(d["id"]) else {}

    def rows(self, ids: np.ndarray) -> torch.Tensor:
        return torch.as_tensor([self.row[int(i)] for i in ids], dtype=torch.long)


class InMemoryData:
    """``dynloss.epoch.EpochData`` over prepared splits held in memory (one process)."""

    def __init__(self, c: Components, train: dict, eval_: dict, clean_meta: dict | None = None):
        self.c, self.cfg = c, c.cfg
        self.train, self.eval = Arrays(train), Arrays(eval_)
        self.corrupt = int(train.get("corrupt", 0))  # training images that did not decode (counted every epoch)
        self.clean = Arrays(clean_meta) if clean_meta is not None else None
        self.meta: dict[str, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        ids = torch.sort(self.train.id).values
        if self.cfg.data.shuffle == "none":
            return ids
        g = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, 9, epoch))
        return ids[torch.randperm(len(ids), generator=g)]

    def train_batches(self, epoch: int) -> Iterator[dict]:
        """The whole train split in ``train.batch_size`` batches (``dynloss.epoch`` leaves the meta rows out)."""
        order, size = self._order(epoch), self.cfg.train.batch_size
        for start in range(0, len(order), size):
            ids = order[start:start + size]
            rows = self.train.rows(ids.numpy())
            x = view_batch(self.train.images[rows], self.c.preset, self.cfg.data.train_view,
                           batch_seed(self.cfg.train.seed, ids.numpy(), epoch))
            yield {"id": ids, "x": x, "label": self.train.label[rows], "corrupt": self.corrupt if start == 0 else 0}

    def _plain(self, split: Arrays) -> Iterator[dict]:
        ids = torch.sort(split.id).values
        for start in range(0, len(ids), EVAL_BATCH):
            rows = split.rows(ids[start:start + EVAL_BATCH].numpy())
            yield {"id": split.id[rows], "x": view_batch(split.images[rows], self.c.preset, "eval"),
                   "label": split.label[rows], "true_label": split.true_label[rows]}

    def rank_batches(self, epoch: int) -> Iterator[dict]:
        return self._plain(self.train)

    def eval_batches(self, epoch: int) -> Iterator[dict]:
        return self._plain(self.eval)

    def set_meta(self, ids: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        """Clean metadata first, then the sampled training rows in id order (as the Ray driver reads them)."""
        parts = []
        if self.clean is not None:
            parts.append((self.clean, torch.arange(len(self.clean.id))))
        if len(ids):
            parts.append((self.train, self.train.rows(np.unique(ids))))
        self.meta = {k: torch.cat([getattr(a, k)[r] for a, r in parts]) for k in ("images", "label", "true_label")}
        return {"label": self.meta["label"].numpy(), "true_label": self.meta["true_label"].numpy()}

    def meta_batch(self, index: np.ndarray, view: str, seed: int) -> dict:
        idx = torch.as_tensor(index, dtype=torch.long)
        return {"x": view_batch(self.meta["images"][idx], self.c.preset, view, seed),
                "label": self.meta["label"][idx]}


@dataclass
class LocalResult:
    history: list[dict[str, float]]   # per-epoch metrics, last = final
    components: Components
    state: TrainState
    per_class: np.ndarray | None


def load_data(c: Components) -> InMemoryData:
    cfg = c.cfg
    clean = load_split_numpy(cfg.sampling.clean_meta, "train", mode=c.mode) if cfg.sampling.clean_meta else None
    return InMemoryData(c, load_split_numpy(cfg.data.path, "train", mode=c.mode),
                        load_split_numpy(cfg.data.path, cfg.data.eval_split, mode=c.mode), clean)


def train_local(cfg: Config, device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> LocalResult:
    """Train ``cfg`` for ``train.epochs`` epochs; evaluation every ``train.eval_every`` epochs and at the end."""
    c = build_components(cfg, check_dataset(cfg), device)
    data, state = load_data(c), TrainState()
    history, per_class, t0, epochs = [], None, time.perf_counter(), cfg.train.epochs
    for epoch in range(epochs):
        metrics = run_epoch(c, data, state, epoch)
        notice = flip_notice(c, state, metrics)
        if notice:
            log(f"[{cfg.run.name}] {notice}")
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch == epochs - 1:
            evaluated, per_class = evaluate(c, data, state, epoch)
            metrics.update(evaluated)
            warning = watch_collapse(c, state, metrics, epoch)
            if warning:
                log(f"[{cfg.run.name}] {warning}")
        metrics.update({"epoch": epoch, "time/s": time.perf_counter() - t0})
        history.append(metrics)
        log(f"[{cfg.run.name}] epoch {epoch + 1}/{epochs}  {final_line(metrics)}  {metrics['time/s']:.0f} s")
    return LocalResult(history, c, state, per_class)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynloss.local", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML (pipelines/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable): --set optim.lr=0.05")
    p.add_argument("--compare", nargs="+", metavar="LOSS", help="train once per loss and print the final table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="PATH", help="write every run's per-epoch metrics here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        configs = {loss: load_config(args.config, [*args.set, f"loss.name={loss}", f"run.name={cfg.run.name}-{loss}"])
                   for loss in args.compare} if args.compare else {cfg.loss.name: cfg}
        results, seconds = {}, {}
        for loss, c in configs.items():
            t0 = time.perf_counter()
            results[loss] = train_local(c, args.device).history
            seconds[loss] = time.perf_counter() - t0
    except ConfigError as e:
        print(f"local: invalid config {e}", file=sys.stderr)
        return 2
    print(f"\nclean-test results ({args.config} {' '.join(args.set)})")
    print(compare_table({k: h[-1] for k, h in results.items()}, seconds), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "set": args.set, "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
