"""One builder of the training components from the one validated ``Config`` (STYLE.md point 6).

Model, optimizer, lr schedule, criterion (a robust-loss baseline) or Dynamic Loss with its meta optimizer,
the weight average evaluation uses (``train.ema_decay``), the engine's ``MetaSettings``, the augmentation
preset and the device settings (bfloat16 autocast, channels_last; on a CPU, glibc's heap kept between steps:
``dynloss.host_memory``): every driver (the Ray Train worker, the Ray-free runner ``dynloss.local``) gets them from
``build_components`` and nowhere else, so a setting cannot mean one thing in one driver and another in the other.

    python -c "from dynloss.config import load_config; from dynloss.builder import build_components; \
from dynloss.data import read_manifest; c = load_config('pipelines/configs/digits.yaml'); \
print(build_components(c, read_manifest(c.data.path), 'cpu').settings)"
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dynloss import host_memory
from dynloss.config import Config
from dynloss.data.batches import resolve_preset
from dynloss.data.decode import mode_from_manifest
from dynloss.data.transforms import Preset, preset_for_source
from dynloss.dynamic import DynamicLoss
from dynloss.engine import MetaSettings
from dynloss.losses import build_loss, needs_class_counts
from dynloss.meta import build_meta_optimizer, unwrap
from dynloss.models import build_model
from dynloss.schedules import build_scheduler


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (run seed, purpose, epoch, rank, ...): every random stream is named."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class Components:
    """Everything one training process holds; ``model`` may be replaced by a DDP wrapper of itself."""
    cfg: Config
    model: nn.Module
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module | None        # a robust-loss baseline (None for the Dynamic Loss)
    dyn: DynamicLoss | None
    meta_optimizer: torch.optim.Optimizer | None
    settings: MetaSettings
    preset: Preset
    preset_name: str
    mode: str
    num_classes: int
    counts: list[int]                  # training images per given label
    train_rows: int
    device: torch.device
    amp: torch.dtype | None            # bfloat16 autocast on CUDA, else None
    channels_last: bool
    steps_per_epoch: int
    ema: AveragedModel | None = None   # train.ema_decay: the weight average (evaluated as train.ema_eval says)

    @property
    def inner(self) -> nn.Module:
        """The plain module (inference passes skip DDP: workers may see different numbers of batches)."""
        return unwrap(self.model)

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp) if self.amp is not None else nullcontext()

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the memory format the model was built for: uint8 views (what the
        presets make) are copied as uint8 and normalised there (``Preset.normalise``); a float batch is taken as
        normalised already."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = self.preset.normalise(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def ema_update(decay: float, warmup: bool = False) -> Callable:
    """``multi_avg_fn`` of the weight average: e <- d e + (1 - d) theta. With ``warmup`` (``train.ema_warmup``)
    d = min(decay, (1 + n) / (10 + n)) after n updates (the ``num_updates`` rule of TensorFlow's
    ExponentialMovingAverage), so a short run averages its recent weights rather than its first ones; d is a
    tensor on the parameters' device (no host sync). n is the average's own counter, kept in checkpoints."""
    if not warmup:
        return get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = torch.clamp((1.0 + n) / (10.0 + n), max=decay)
        if averaged[0].is_floating_point():
            d = d.to(averaged[0].dtype)
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))
        else:  # integer buffers (batch norm's step count), as torch's own EMA treats them
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a * d + c * (1 - d))

    return update


def meta_settings(cfg: Config) -> MetaSettings:
    d = cfg.dynamic
    return MetaSettings(scope=d.scope, meta_interval=d.meta_interval, warmup_epochs=d.warmup_epochs,
                        corrector_pretrain_iters=d.corrector_pretrain_iters, mix=d.mix, finetune=d.finetune,
                        max_grad_norm=cfg.optim.max_grad_norm, warmup_loss=d.warmup_loss,
                        pseudo_from=d.pseudo_from, meta_grad=d.meta_grad)


def build_dynamic(cfg: Config, num_classes: int, counts) -> DynamicLoss:
    d = cfg.dynamic
    return DynamicLoss(num_classes, rank_buckets=d.rank_buckets, hidden=d.hidden,
                       class_counts=counts if d.margin_prior == "log_prior" else None,
                       margin_prior=d.margin_prior, prior_tau=d.prior_tau, rank_init=d.rank_init,
                       corrector=d.corrector)


def build_criterion(cfg: Config, num_classes: int, counts) -> nn.Module:
    params = dict(cfg.loss.params)
    if needs_class_counts(cfg.loss.name):
        params.setdefault("class_counts", list(counts))
    return build_loss(cfg.loss.name, num_classes, preset=cfg.loss.preset, **params)


def build_preset(cfg: Config, manifest: Mapping) -> tuple[str, str, Preset]:
    """The run's augmentation preset: its name (``data.preset`` or the source's), decode mode, built views."""
    name = cfg.data.preset or preset_for_source(manifest["source"])
    mode = mode_from_manifest(manifest)
    return name, mode, resolve_preset(name, mode=mode, **cfg.data.preset_params)


def build_components(cfg: Config, manifest: Mapping, device: torch.device | str, *, world: int = 1,
                     rank: int = 0) -> Components:
    """Build a run's components for one of ``world`` processes; seeds torch/numpy/random for ``rank``.

    The initial weights are the same in every process (``train.seed``); the streams drawn afterwards
    (Gumbel noise, augmentation outside seeded views) differ per rank.
    """
    device = torch.device(device)
    train = manifest["splits"]["train"]
    num_classes, train_rows = int(manifest["num_classes"]), int(train["rows"])
    counts = [int(c) for c in train["counts"]]
    preset_name, mode, preset = build_preset(cfg, manifest)
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda and cfg.train.amp != "off" and torch.cuda.is_bf16_supported() else None
    if cuda and cfg.train.amp == "on" and amp is None:
        raise ValueError("train.amp: on needs a GPU with bfloat16 (the meta step has no fp16 loss scaling); "
                         "use auto or off")
    channels_last = cuda and cfg.train.channels_last != "off"
    if device.type == "cpu":
        host_memory.keep_freed_heap()  # CPU tensors reuse the heap instead of faulting fresh pages in each step

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, num_classes, in_chans=preset.channels, pretrained=cfg.model.pretrained).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                nesterov=o.nesterov)
    # Ray Data's equal split gives each worker at most floor(rows / world) rows
    steps_per_epoch = max(1, math.ceil((train_rows // world) / (cfg.train.batch_size // world)))
    scheduler = build_scheduler(optimizer, o.schedule, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs,
                                warmup_epochs=o.warmup_epochs, milestones=o.milestones, gamma=o.gamma)
    dyn = meta_optimizer = criterion = None
    if cfg.is_dynamic:
        dyn = build_dynamic(cfg, num_classes, counts).to(device)
        meta_optimizer = build_meta_optimizer(dyn, cfg.dynamic.meta_lr, cfg.dynamic.margin_meta_lr)
    else:
        criterion = build_criterion(cfg, num_classes, counts).to(device)
    ema = None
    # ema_eval "flipped": only a run with a flip check can come to evaluate the average. Every optimizer step
    # (train, meta actual step, fine-tune) moves it.
    if cfg.train.ema_decay is not None and (cfg.train.ema_eval == "always" or cfg.checks_flips):
        update = ema_update(cfg.train.ema_decay, cfg.train.ema_warmup)
        ema = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: ema.update_parameters(model))
    torch.manual_seed(derive_seed(cfg.train.seed, 1, rank))
    np.random.seed(derive_seed(cfg.train.seed, 2, rank))
    random.seed(derive_seed(cfg.train.seed, 3, rank))
    return Components(cfg, model, optimizer, scheduler, criterion, dyn, meta_optimizer, meta_settings(cfg), preset,
                      preset_name, mode, num_classes, counts, train_rows, device, amp, channels_last, steps_per_epoch,
                      ema)
