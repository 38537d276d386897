"""Training checkpoints as directories: everything a resumed run needs, readable with ``weights_only=True``.

Layout of a checkpoint directory (what the Ray Train loop reports every epoch):
  state.pt          theta (model), phi (DynamicLoss), both optimizers, the lr scheduler, epoch, global
                    iteration, the rank table (rank bucket per training id), the training-loss state, the
                    weight average with ``train.ema_decay`` (what ``eval_weights`` gives evaluation)
                    (it also holds the resolved config and ``extra``: train class counts, class names, preset)
  rng-rank{r}.pt    each worker's RNG states (python, numpy, torch CPU, CUDA), restored by the same rank
  config.json       the resolved config (dynloss.config.Config.resolved()), human-readable
  meta.json         epoch, iteration, metrics of that epoch (for people and scripts; a rerun logs them to MLflow
                    when the killed run had registered the epoch but not yet logged it: pipelines.train)
  per_class.json    per-class test accuracy of the epoch's evaluation      (written by pipelines.train)
  label_report.parquet  id, given/predicted/true label, trust w (last epoch; written by pipelines.train)
Everything is plain tensors / numbers / strings, so ``torch.load(..., weights_only=True)`` reads it: a
checkpoint from elsewhere cannot run code on load.

    python -c "from dynloss.checkpoint import load_state; \
s = load_state('runs/digits-dynamic/checkpoint_epoch0019'); print(s['epoch'], s['extra'])"
"""
from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from dynloss.config import Train

STATE = "state.pt"
CONFIG = "config.json"
META = "meta.json"
FORMAT = 1


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _unwrap(model: nn.Module) -> nn.Module:
    from dynloss.meta import unwrap

    return unwrap(model)


def save_state(directory: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
               epoch: int, iteration: int, config: dict, dyn: nn.Module | None = None,
               meta_optimizer: torch.optim.Optimizer | None = None, rank_table: torch.Tensor | None = None,
               criterion: nn.Module | None = None, metrics: dict | None = None, extra: dict | None = None,
               ema: nn.Module | None = None) -> None:
    """Write state.pt, config.json and meta.json into ``directory`` (created if needed).

    ``extra``: plain values evaluation needs without the dataset that trained the model (train class counts,
    class names, preset name and decode mode).
    """
    os.makedirs(directory, exist_ok=True)
    state = {
        "format": FORMAT,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "dyn": dyn.state_dict() if dyn is not None else None,
        "meta_optimizer": meta_optimizer.state_dict() if meta_optimizer is not None else None,
        "rank_table": rank_table.detach().cpu() if rank_table is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "criterion": {"epoch": getattr(criterion, "epoch", 0),
                      "total_epochs": getattr(criterion, "total_epochs", None)},
        "config": config,
        "extra": extra or {},
    }
    torch.save(state, os.path.join(directory, STATE))
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(directory, META), "w") as f:
        json.dump({"format": FORMAT, "epoch": int(epoch), "iteration": int(iteration),
                   "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}}, f,
                  indent=1)


def load_state(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state.pt of a checkpoint directory, a local path or a URI (weights_only: tensors and plain values)."""
    import io

    from dynloss.data import storage

    fs, root = storage.resolve(directory)
    path = storage.join(root, STATE)
    if not storage.is_file(fs, path):
        raise ValueError(f"{directory}: not a dynloss checkpoint (no {STATE}); pass a checkpoint directory such as "
                         "runs/NAME/checkpoint_epoch0009")
    path = storage.display(str(directory).rstrip("/"), STATE)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(fs, storage.join(root, STATE))), map_location=map_location,
                           weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError... for a bad file
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]}); the file is truncated or not a "
                         "dynloss checkpoint: use another checkpoint_epochNNNN of the run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        state = state if isinstance(state, dict) else {}
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
    return state


def restore(state: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scheduler=None, dyn: nn.Module | None = None, meta_optimizer: torch.optim.Optimizer | None = None,
            criterion: nn.Module | None = None, ema: nn.Module | None = None) -> None:
    """Load a ``load_state`` result into freshly built objects (model before any DDP wrap, or unwrapped)."""
    _unwrap(model).load_state_dict(state["model"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if dyn is not None and state.get("dyn") is not None:
        dyn.load_state_dict(state["dyn"])
    if meta_optimizer is not None and state.get("meta_optimizer") is not None:
        meta_optimizer.load_state_dict(state["meta_optimizer"])
    crit = state.get("criterion") or {}
    if criterion is not None and hasattr(criterion, "set_epoch") and crit.get("total_epochs"):
        criterion.set_epoch(crit["epoch"], crit["total_epochs"])


def eval_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The model weights evaluation uses: the weight average's when the run kept one (``train.ema_decay``) and
    evaluated it (with ``train.ema_eval: flipped``, once its flip check had fired: ``dynloss.epoch.averaged``)."""
    train = Train.model_validate(state["config"]["train"])
    if state.get("ema") is None or not train.evaluates_average((state.get("extra") or {}).get("flipped")):
        return state["model"]
    prefix = "module."  # torch.optim.swa_utils.AveragedModel holds the averaged copy as ``module``
    return {k.removeprefix(prefix): v for k, v in state["ema"].items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: str, rank: int) -> None:
    os.makedirs(directory, exist_ok=True)
    torch.save(rng_state(), os.path.join(directory, rng_file(rank)))


def load_rng(directory: str, rank: int) -> bool:
    """Restore this rank's RNG states from a checkpoint; False when it has none (e.g. more workers now)."""
    path = os.path.join(directory, rng_file(rank))
    if not os.path.isfile(path):
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True


def read_config(directory: str) -> dict:
    with open(os.path.join(directory, CONFIG)) as f:
        return json.load(f)


def read_metrics(path: str) -> dict:
    """The metrics of a checkpoint's epoch (its meta.json; local path or URI); empty when missing or unreadable."""
    from dynloss.data import storage

    fs, root = storage.resolve(path)
    try:
        return dict(json.loads(storage.read_bytes(fs, storage.join(root, META))).get("metrics") or {})
    except (OSError, ValueError, AttributeError):
        return {}
