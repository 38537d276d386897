"""Source readers, one module per on-disk format, behind one registry.

    python -c "from dynloss.data.sources import SOURCES, load_source; print(sorted(SOURCES)); print(load_source('digits'))"
"""

from __future__ import annotations

from dynloss.data.sources.animal10n import read_animal10n
from dynloss.data.sources.base import UNKNOWN, Source, SplitData
from dynloss.data.sources.cifar import read_cifar
from dynloss.data.sources.digits import read_digits
from dynloss.data.sources.folder import read_folder
from dynloss.data.sources.idx import read_idx
from dynloss.data.sources.imagenet_lt import read_imagenet_lt
from dynloss.data.sources.webvision import read_webvision

# name -> reader(name, root, **options) -> Source
SOURCES = {
    "cifar10": read_cifar,
    "cifar100": read_cifar,
    "fashion-mnist": read_idx,
    "mnist": read_idx,
    "webvision": read_webvision,
    "webvision-mini": read_webvision,
    "imagenet-lt": read_imagenet_lt,
    "animal10n": read_animal10n,
    "folder": read_folder,
    "digits": read_digits,
}
# Where a source is installed on these machines when --root is not given (Debian `dataset-fashion-mnist`).
DEFAULT_ROOTS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
NO_ROOT = {"digits"}


def load_source(name: str, root: str | None = None, **options) -> Source:
    """Read source `name` from `root` (a local path or a filesystem URI).

    options: `imagenet_val` (webvision*), `lists` (imagenet-lt). Raises ValueError naming the missing root,
    file or bad line, or listing the valid names.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")
    root = root or DEFAULT_ROOTS.get(name)
    if root is None and name not in NO_ROOT:
        raise ValueError(f"source {name!r} needs --root (the folder or URI holding its files)")
    return SOURCES[name](name, root, **options)


__all__ = ["DEFAULT_ROOTS", "SOURCES", "UNKNOWN", "Source", "SplitData", "load_source"]
