"""Augmentation presets by name: a weak view, a strong view and an eval view per dataset family.

The Dynamic Loss input pipeline decodes an image once and makes both a weak and a strong view from it
(DESIGN.md section 5, "Ingest"). Every preset works on uint8 CHW tensors (what `dynloss.data.decode`
returns), built from torchvision.transforms.v2, and its views stay uint8: what crosses Ray's object store and
the host-to-device copy is a quarter of float32's bytes, and the float conversion + normalisation, more than half
of the CPU time of a weak 224-px JPEG view, runs once per batch where the batch lands (`Preset.normalise`, called
by `dynloss.builder.Components.input`: on the GPU when there is one), as FFCV and DALI pipelines do.

- `cifar` / `cifar100`: weak = RandomCrop(32, padding=4) + horizontal flip; strong = weak + AutoAugment
  (CIFAR10 policy, Cubuk et al. 2019) + Cutout 16x16 (DeVries & Taylor 2017, "Improved Regularization
  of Convolutional Neural Networks with Cutout"); their code cuts after normalisation, so the hole holds the
  dataset mean: here it holds the mean pixel (`fill`, within half a grey level of it).
- `imagenet` (also `webvision`, `imagenet-lt`, `folder`): weak = RandomResizedCrop(size) + flip;
  strong = weak + RandAugment (or AutoAugment IMAGENET policy); eval = Resize(round(1.14 size)) +
  CenterCrop(size). size = 224 by default; pass size=299 for inception_resnet_v2 on WebVision.
- `animal10n`: 64x64 images; weak = RandomCrop(64, padding=4) + flip (Song et al. 2019, SELFIE),
  strong = weak + RandAugment.
- `mnist` / `fashion-mnist`: weak = RandomCrop(28, padding=2) for mnist, a horizontal flip alone for fashion-mnist;
  strong = weak + small RandomAffine + RandomErasing (filled with the mean pixel, as Cutout); eval = the image
  as decoded. `padding=0` drops the crop.
- `digits` (scikit-learn 8x8): weak = RandomCrop(8, padding=1); strong = weak + small affine + erasing.

Randomness comes from torch's global generator (what v2 transforms use); `make_views(..., seed=s)`
makes a batch reproducible without touching the caller's generator.

    .venv/bin/python -c "import torch; from dynloss.data.transforms import build_preset, make_views; \
p = build_preset('cifar'); v = make_views([torch.zeros(3, 32, 32, dtype=torch.uint8)] * 2, p, train=True, seed=0); \
print({k: tuple(t.shape) for k, t in v.items()})"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from dynloss.data.decode import CHANNELS, check_mode

Transform = Callable[[torch.Tensor], torch.Tensor]

# Per-channel statistics of the training sets (0-1 pixel scale).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
DIGITS_STATS = ((0.3053,), (0.3760,))  # sklearn load_digits, pixel / 16

# Resize-then-crop ratio of the standard ImageNet eval (256 / 224).
EVAL_RESIZE_RATIO = 1.14


@dataclass(frozen=True)
class Preset:
    """Three views over uint8 CHW input, uint8 output of shape [C, *size]; `normalise` turns a batch of them into
    the float32 input of the model."""

    name: str
    mode: str  # "L" or "RGB": what the images must be decoded as
    size: tuple[int, int]  # output H, W of every view
    weak: Transform
    strong: Transform
    eval: Transform
    mean: tuple[float, ...]  # per channel, 0-1 pixel scale
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return CHANNELS[self.mode]

    @property
    def view_bytes(self) -> int:
        """Bytes of one view of one image (uint8 [C, *size])."""
        return self.channels * self.size[0] * self.size[1]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 views [..., C, H, W] (on any device) -> float32 (x / 255 - mean) / std, what the model takes.

        One conversion, then one in-place subtract and multiply per channel with Python numbers (no per-channel
        tensors to move to the device): on one CPU thread 2.9x faster than torchvision's ToDtype + Normalize on
        224-px batches, 11x on 28x28 ones, equal to them within 1e-6."""
        if images.dtype != torch.uint8:
            raise ValueError(f"preset {self.name!r} normalises uint8 views, got {images.dtype}")
        x = images.to(torch.float32)
        for c, (m, s) in enumerate(zip(self.mean, self.std)):
            x[..., c, :, :].sub_(255 * m).mul_(1 / (255 * s))
        return x


def fill(stats, mode: str) -> list[int]:
    """The mean pixel per channel (uint8): what an erased region holds; after normalisation 0 to within half a grey
    level."""
    return [round(255 * m) for m in _stats(stats, CHANNELS[mode])[0]]


class Cutout(torch.nn.Module):
    """Fill one size x size square whose centre is uniform over the image (clipped at the borders) with ``value``
    (one number, or one per channel).

    DeVries & Taylor 2017. v2.RandomErasing can fix a 16x16 size (scale and ratio pinned) but always
    places the patch fully inside the image, which makes holes at the border impossible; this is the
    paper's version. The presets fill with the mean pixel (the paper zeroes after normalisation: the mean).
    """

    def __init__(self, size: int = 16, value: float | Sequence[float] = 0) -> None:
        super().__init__()
        self.size = int(size)
        # built once, not per image; assigning it into the image casts it to the image's dtype and device
        self.value = torch.tensor([value] if isinstance(value, (int, float)) else list(value),
                                  dtype=torch.float32).view(-1, 1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(0, h, (1,))), int(torch.randint(0, w, (1,)))
        y0, y1 = max(cy - self.size // 2, 0), min(cy + self.size // 2, h)
        x0, x1 = max(cx - self.size // 2, 0), min(cx + self.size // 2, w)
        out = img.clone()
        out[..., y0:y1, x0:x1] = self.value
        return out


def _stats(stats: tuple[Sequence[float], Sequence[float]], channels: int) -> tuple[list[float], list[float]]:
    """Adapt 1- or 3-channel statistics to the decode mode (e.g. a grayscale folder with imagenet)."""
    mean, std = list(stats[0]), list(stats[1])
    if len(mean) == channels:
        return mean, std
    if channels == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return mean * channels, std * channels


def _preset(name: str, mode: str, size: int, stats, weak: list, strong: list, evals: list) -> Preset:
    """A Preset from its three transform lists (an empty list: the image as decoded) and the training set's
    statistics adapted to the decode mode."""
    mean, std = _stats(stats, CHANNELS[mode])
    compose = [v2.Compose(t) if t else v2.Identity() for t in (weak, strong, evals)]
    return Preset(name, mode, (size, size), *compose, mean=tuple(mean), std=tuple(std))


def _cifar(mode: str | None = None, stats=CIFAR10_STATS, name: str = "cifar", cutout: int = 16) -> Preset:
    mode = check_mode(mode or "RGB")
    base = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    strong = base + [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)]
    if cutout:
        strong.append(Cutout(cutout, fill(stats, mode)))
    return _preset(name, mode, 32, stats, base, strong, [])


def _cifar100(mode: str | None = None, **kwargs) -> Preset:
    return _cifar(mode, stats=kwargs.pop("stats", CIFAR100_STATS), name="cifar100", **kwargs)


_STRONG_POLICIES: dict[str, Callable[[], Transform]] = {
    "randaugment": lambda: v2.RandAugment(),
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
}


def _strong_policy(policy: str) -> Transform:
    if policy not in _STRONG_POLICIES:
        raise ValueError(f"strong policy {policy!r} is not known; valid: {sorted(_STRONG_POLICIES)}")
    return _STRONG_POLICIES[policy]()


def _imagenet(mode: str | None = None, size: int = 224, policy: str = "randaugment", stats=IMAGENET_STATS,
              name: str = "imagenet") -> Preset:
    mode = check_mode(mode or "RGB")
    size = int(size)
    base = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    evals = [v2.Resize(round(size * EVAL_RESIZE_RATIO), antialias=True), v2.CenterCrop(size)]
    return _preset(name, mode, size, stats, base, base + [_strong_policy(policy)], evals)


def _animal10n(mode: str | None = None, size: int = 64, policy: str = "randaugment", stats=IMAGENET_STATS) -> Preset:
    mode = check_mode(mode or "RGB")
    size = int(size)
    base = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]
    # Animal-10N images are all 64x64; the resize only guards against a folder of other sizes.
    evals = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return _preset("animal10n", mode, size, stats, base, base + [_strong_policy(policy)], evals)


def _small_gray(name: str, size: int, padding: int, flip: bool, stats, mode: str | None,
                degrees: float, erase_scale: tuple[float, float]) -> Preset:
    mode = check_mode(mode or "L")
    # padding 0: no crop (a weak view of flips only, or none at all: a deterministic view)
    base = ([v2.RandomCrop(size, padding=padding)] if padding else []) + ([v2.RandomHorizontalFlip()] if flip else [])
    strong = base + [v2.RandomAffine(degrees=degrees, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                     v2.RandomErasing(p=0.5, scale=erase_scale, value=fill(stats, mode))]
    return _preset(name, mode, size, stats, base, strong, [])


def _mnist(mode: str | None = None, flip: bool = False, stats=MNIST_STATS, name: str = "mnist",
           padding: int = 2) -> Preset:
    return _small_gray(name, 28, padding, flip, stats, mode, degrees=10, erase_scale=(0.02, 0.15))


def _fashion_mnist(mode: str | None = None, flip: bool = True, stats=FASHION_MNIST_STATS, padding: int = 0) -> Preset:
    # flips only by default: the 2-pixel crop cost ~3.5 points of top-1 on the 10-epoch Fashion-MNIST-LT job
    # (docs/method.md); padding=2 brings it back
    return _mnist(mode, flip=flip, stats=stats, name="fashion-mnist", padding=padding)


def _digits(mode: str | None = None, flip: bool = False, stats=DIGITS_STATS, padding: int = 1) -> Preset:
    return _small_gray("digits", 8, padding, flip, stats, mode, degrees=10, erase_scale=(0.02, 0.1))


#: preset name -> factory(mode=None, **params) -> Preset
PRESETS: dict[str, Callable[..., Preset]] = {
    "cifar": _cifar,
    "cifar100": _cifar100,
    "imagenet": _imagenet,
    "webvision": lambda mode=None, **kw: _imagenet(mode, name="webvision", **kw),
    "imagenet-lt": lambda mode=None, **kw: _imagenet(mode, name="imagenet-lt", **kw),
    "animal10n": _animal10n,
    "mnist": _mnist,
    "fashion-mnist": _fashion_mnist,
    "digits": _digits,
}

#: `dynloss prepare` source name -> default preset name.
SOURCE_PRESETS: dict[str, str] = {
    "cifar10": "cifar",
    "cifar100": "cifar100",
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "webvision": "webvision",
    "webvision-mini": "webvision",
    "imagenet-lt": "imagenet-lt",
    "animal10n": "animal10n",
    "folder": "imagenet",
    "digits": "digits",
}


def build_preset(name: str, mode: str | None = None, **params) -> Preset:
    """Preset `name` for images decoded as `mode` ("L"/"RGB"; None = the preset's own default).

    params go to the preset factory, e.g. build_preset("webvision", size=299, policy="autoaugment"),
    build_preset("mnist", flip=True).
    """
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not known; valid presets: {sorted(PRESETS)}")
    try:
        return PRESETS[name](mode, **params)
    except TypeError as exc:
        raise ValueError(f"preset {name!r}: bad parameters {sorted(params)}: {exc}") from exc


def preset_for_source(source: str) -> str:
    """Default preset name for a manifest `source` (as written by `dynloss prepare`)."""
    if source not in SOURCE_PRESETS:
        raise ValueError(f"no default preset for source {source!r}; known sources: {sorted(SOURCE_PRESETS)}; "
                         f"pass a preset explicitly (one of {sorted(PRESETS)})")
    return SOURCE_PRESETS[source]


def _stack(views: list[torch.Tensor], preset: Preset, which: str) -> torch.Tensor:
    try:
        return torch.stack(views)
    except RuntimeError as exc:
        shapes = sorted({tuple(v.shape) for v in views})
        raise ValueError(f"preset {preset.name!r} {which} view produced different shapes {shapes}; "
                         f"this preset expects {preset.size} inputs (choose a preset that resizes)") from exc


TRAIN_VIEWS = ("weak", "strong")


def make_views(images: Sequence[torch.Tensor], preset: Preset, train: bool, seed: int | None = None,
               views: Sequence[str] = TRAIN_VIEWS) -> dict[str, torch.Tensor]:
    """Views of a batch of decoded uint8 CHW images, one decode shared by the train views.

    train=True -> {"weak": [B,C,H,W], "strong": [B,C,H,W]} (or only the ``views`` asked for: a stream that
    trains on the weak view need not pay for the strong one's augmentation); train=False -> {"x": [B,C,H,W]};
    uint8 (``preset.normalise`` makes the model's float32 input of them). seed: make the augmentation
    reproducible (the caller's torch RNG state is left untouched); the views draw from it in the order given, so
    ``views=("weak",)`` gives the weak view of the default call.
    """
    bad = [v for v in views if v not in TRAIN_VIEWS]
    if bad or not views:
        raise ValueError(f"views must be a non-empty selection of {TRAIN_VIEWS}, got {tuple(views)}")
    for i, img in enumerate(images):
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != preset.channels:
            raise ValueError(f"image {i}: expected uint8 [{preset.channels}, H, W] for preset {preset.name!r} "
                             f"(mode {preset.mode}), got {img.dtype} {tuple(img.shape)}; decode with mode={preset.mode!r}")
    with _seeded(seed):
        return _views(images, preset, train, views)


def view_batch(images: Sequence[torch.Tensor], preset: Preset, view: str, seed: int | None = None) -> torch.Tensor:
    """One view ("weak", "strong" or "eval") of a non-empty batch of decoded images, seeded as in make_views."""
    transform = getattr(preset, view)
    with _seeded(seed):
        return _stack([transform(img) for img in images], preset, view)


@contextmanager
def _seeded(seed: int | None):
    """torch's CPU generator seeded with ``seed`` inside, the caller's state restored after (None: left as it is).

    The transforms draw their parameters there, also for images on a GPU. Only that generator is seeded:
    ``torch.manual_seed`` would also reseed every CUDA generator, which ``fork_rng(devices=[])`` does not restore
    (a training process's dropout and Gumbel noise on the GPU would restart from the seed of its last meta batch)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _views(images: Sequence[torch.Tensor], preset: Preset, train: bool, views: Sequence[str]
           ) -> dict[str, torch.Tensor]:
    c, (h, w) = preset.channels, preset.size
    if not images:
        empty = torch.empty((0, c, h, w), dtype=torch.uint8)
        return {v: empty.clone() for v in views} if train else {"x": empty}
    if not train:
        return {"x": _stack([preset.eval(img) for img in images], preset, "eval")}
    return {v: _stack([getattr(preset, v)(img) for img in images], preset, v) for v in views}
